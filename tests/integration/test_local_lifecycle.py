"""LocalFederation leaves nothing behind: not on exit, interrupt, GC, exit, or a killed parent.

Each scenario runs a real parent process (as a Jupyter kernel would be) that starts real
node processes, and checks from outside that the nodes and the temp dir are gone.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federation import Count, LocalFederation, Mean
from federation._workdir import remove_stale_workdirs
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.errors import InvalidRequestError

pytestmark = pytest.mark.slow  # each test starts real nodes (seconds); all run in CI

DEADLINE_S = 30.0  # generous: a deadline for "eventually", not a performance threshold

PARENT = textwrap.dedent(
    """
    import json, sys, time
    from federation import LocalFederation

    local = LocalFederation.synthetic(rows=500, tls=False)
    fed = local.start()
    pids = [p.process.pid for p in local.processes.values()]
    print(json.dumps({"pids": pids, "workdir": str(local.workdir)}), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # no stop(): the interpreter-exit finalizer must clean up
    with local:  # already started: __enter__ would start twice, so only use __exit__
        pass
    """
)

WITH_BLOCK = textwrap.dedent(
    """
    import json, signal, time
    from federation import LocalFederation

    # A kernel turns SIGINT into KeyboardInterrupt even when started as a background job,
    # which inherits SIGINT ignored (the shell's rule for `cmd &`): do as a kernel does.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    local = LocalFederation.synthetic(rows=500, tls=False)
    with local as fed:
        pids = [p.process.pid for p in local.processes.values()]
        print(json.dumps({"pids": pids, "workdir": str(local.workdir)}), flush=True)
        time.sleep(600)  # a long cell, interrupted or killed from outside
    """
)


INTERRUPTED_CELL = textwrap.dedent(
    """
    import json, signal, time
    from federation import Count, LocalFederation

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a kernel does
    local = LocalFederation.synthetic(rows=500, tls=False)
    fed = local.start()
    pids = [p.process.pid for p in local.processes.values()]
    try:  # printed inside: the interrupt may come as soon as the line is read
        print(json.dumps({"pids": pids, "workdir": str(local.workdir)}), flush=True)
        time.sleep(600)  # a long cell
    except KeyboardInterrupt:  # the kernel shows it, and the notebook goes on
        pass
    print(json.dumps({"count": fed.analyze(Count("credit"), epsilon=0.5).value}), flush=True)
    local.stop()
    """
)


def _is_gone(pid: int) -> bool:
    """Whether the process has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not _is_gone(pid)]
        if not alive:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if not _is_gone(pid)]


@pytest.fixture
def run_parent(tmp_path: Path) -> Iterator[object]:
    """Start a parent process in its own temp dir; it prints its node pids and workdir."""
    started: list[subprocess.Popen[str]] = []

    def run(script: str, *args: str) -> tuple[subprocess.Popen[str], list[int], Path]:
        env = os.environ | {"TMPDIR": str(tmp_path)}
        # A group of its own, as a kernel's: signalling the group must not reach pytest.
        parent = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        started.append(parent)
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, f"the parent exited early (code {parent.wait()})"
        info = json.loads(line)
        workdir = Path(info["workdir"])
        assert workdir.parent == tmp_path
        assert workdir.exists()
        assert all(not _is_gone(pid) for pid in info["pids"])
        return parent, info["pids"], workdir

    yield run
    for parent in started:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_killed_parent_takes_its_nodes_with_it_and_the_next_run_removes_its_dir(
    run_parent: object, tmp_path: Path
) -> None:
    parent, pids, workdir = run_parent(WITH_BLOCK)  # type: ignore[operator]
    parent.send_signal(signal.SIGKILL)  # a kernel killed outright runs no cleanup code
    parent.wait()
    assert _wait_gone(pids) == [], "node processes outlived their killed parent"
    # A SIGKILLed process cannot remove its temp dir; the next LocalFederation does.
    assert workdir.exists()
    assert remove_stale_workdirs(tmp_path) == [workdir]
    assert not workdir.exists()


def test_interrupted_with_block_stops_nodes_and_removes_the_dir(run_parent: object) -> None:
    parent, pids, workdir = run_parent(WITH_BLOCK)  # type: ignore[operator]
    parent.send_signal(signal.SIGINT)  # what Jupyter's "interrupt kernel" sends
    assert parent.wait(timeout=DEADLINE_S) != 0  # KeyboardInterrupt
    assert _wait_gone(pids) == []
    assert not workdir.exists()


def test_interrupting_a_cell_leaves_the_nodes_serving(run_parent: object) -> None:
    # Jupyter's "interrupt kernel" and a terminal's Ctrl-C signal the whole process group;
    # nodes in the kernel's group stopped on it, and the next cell found none (review).
    parent, pids, workdir = run_parent(INTERRUPTED_CELL)  # type: ignore[operator]
    os.killpg(parent.pid, signal.SIGINT)
    assert parent.stdout is not None
    after = json.loads(parent.stdout.readline())
    assert after["count"] > 0
    assert parent.wait(timeout=DEADLINE_S) == 0
    assert _wait_gone(pids) == []
    assert not workdir.exists()


def test_starting_twice_is_the_same_federation_and_a_stopped_one_says_so() -> None:
    local = LocalFederation.synthetic(rows=500, tls=False)
    fed = local.start()
    pids = [p.process.pid for p in local.processes.values()]
    try:
        assert local.start() is fed  # a notebook cell run again starts nothing new
        assert [p.process.pid for p in local.processes.values()] == pids
    finally:
        local.stop()
    assert _wait_gone(pids) == []
    with pytest.raises(InvalidRequestError, match="stopped and its work dir removed"):
        local.start()
    with pytest.raises(InvalidRequestError, match="this coordinator is closed"):
        fed.analyze(Count("credit"), epsilon=0.5)


def test_restarting_a_node_keeps_the_researchers_coordinator_working() -> None:
    local = LocalFederation.synthetic(rows=500, tls=False)
    with local as fed:
        before = local.processes["shenzhen"].address
        local.restart("shenzhen")
        assert local.processes["shenzhen"].address != before
        assert local.coordinator is fed
        assert fed.analyze(Count("credit"), epsilon=0.5).missing == ()


@pytest.mark.parametrize("how", ["exit", "with"])
def test_interpreter_exit_without_stop_cleans_up(run_parent: object, how: str) -> None:
    parent, pids, workdir = run_parent(PARENT, how)  # type: ignore[operator]
    assert parent.wait(timeout=DEADLINE_S) == 0
    assert _wait_gone(pids) == []
    assert not workdir.exists()


def test_garbage_collection_stops_nodes_and_removes_the_dir() -> None:
    local = LocalFederation.synthetic(rows=500, tls=False)
    fed = local.start()
    pids = [p.process.pid for p in local.processes.values()]
    workdir = local.workdir
    fed.close()
    del local, fed
    gc.collect()
    assert all(_is_gone(pid) for pid in pids)
    assert not workdir.exists()


def test_a_started_coordinator_keeps_its_nodes_alive_without_the_federation() -> None:
    fed = LocalFederation.synthetic(rows=500, tls=False).start()
    gc.collect()
    assert fed.analyze(Count("credit"), epsilon=0.5).value > 0
    fed.close()


def test_from_frames_serves_each_frame_with_the_production_path() -> None:
    data = {
        name: synthetic_credit(jurisdiction=name, rows=2_000, seed=3 + i)
        for i, name in enumerate(("hong-kong", "shenzhen"))
    }
    frames = {name: pd.DataFrame(columns) for name, columns in data.items()}
    local = LocalFederation.from_frames(frames, schema=CREDIT_SCHEMA, tls=False)
    with local as fed:
        count = fed.analyze(Count("credit", group_by="housing"), epsilon=1.0)
        mean = fed.analyze(Mean("credit", "age"), epsilon=1.0)
    pooled = np.concatenate([d["housing"] for d in data.values()])
    for group in count.groups:
        assert abs(group.estimates[0].value - np.sum(pooled == group.group)) < 50
    ages = np.concatenate([d["age"] for d in data.values()])
    assert abs(mean.value - ages.mean()) < 2.0
    assert not local.workdir.exists()
