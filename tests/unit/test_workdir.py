"""Temp work dirs: each records its owner; only dirs of exited owners are removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from federation import _workdir


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale_dir(parent: Path, owner: dict[str, object]) -> Path:
    path = parent / "federation-stale"
    path.mkdir()
    (path / "node").mkdir()
    (path / _workdir.OWNER_FILE).write_text(json.dumps(owner))
    return path


@pytest.fixture
def tmp_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(_workdir.tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_new_workdir_records_this_process_as_its_owner(tmp_tempdir: Path) -> None:
    path = _workdir.make_workdir()
    assert path.parent == tmp_tempdir
    assert path.name.startswith("federation-")
    owner = json.loads((path / _workdir.OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid()
    assert _workdir._is_alive(owner)


def test_a_dir_whose_owner_exited_is_removed(tmp_path: Path) -> None:
    owner = _workdir._owner_record(os.getpid()) | {"pid": _dead_pid()}
    stale = _stale_dir(tmp_path, owner)
    assert _workdir.remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists()


def test_making_a_workdir_removes_stale_ones_first(tmp_tempdir: Path) -> None:
    stale = _stale_dir(tmp_tempdir, _workdir._owner_record(os.getpid()) | {"pid": _dead_pid()})
    fresh = _workdir.make_workdir()
    assert not stale.exists()
    assert fresh.exists()


def test_a_dir_of_a_live_owner_is_kept(tmp_path: Path) -> None:
    kept = _stale_dir(tmp_path, _workdir._owner_record(os.getpid()))
    assert _workdir.remove_stale_workdirs(tmp_path) == []
    assert kept.exists()


def test_a_reused_pid_counts_as_exited(tmp_path: Path) -> None:
    owner = _workdir._owner_record(os.getpid())
    if owner["start_ticks"] is None:
        pytest.skip("no /proc here: start times are unknown")
    assert isinstance(owner["start_ticks"], int)
    stale = _stale_dir(tmp_path, owner | {"start_ticks": owner["start_ticks"] - 1})
    assert _workdir.remove_stale_workdirs(tmp_path) == [stale]


@pytest.mark.parametrize(
    "owner",
    [
        None,  # no owner file: made by an older version, or still being set up
        "not json",
        {"pid": "12"},
        {"pid_namespace": "pid:[1]"},
    ],
)
def test_dirs_without_a_clear_owner_are_left_alone(tmp_path: Path, owner: object) -> None:
    path = tmp_path / "federation-unclear"
    path.mkdir()
    if isinstance(owner, str):
        (path / _workdir.OWNER_FILE).write_text(owner)
    elif isinstance(owner, dict):
        record = {"pid": _dead_pid(), "start_ticks": None, "pid_namespace": None} | owner
        (path / _workdir.OWNER_FILE).write_text(json.dumps(record))
    assert _workdir.remove_stale_workdirs(tmp_path) == []
    assert path.exists()


def test_a_dead_owner_in_another_pid_namespace_is_left_alone(tmp_path: Path) -> None:
    owner = _workdir._owner_record(os.getpid()) | {"pid": _dead_pid(), "pid_namespace": "x"}
    kept = _stale_dir(tmp_path, owner)
    assert _workdir.remove_stale_workdirs(tmp_path) == []
    assert kept.exists()


def test_other_names_and_symlinks_are_never_touched(tmp_path: Path) -> None:
    owner = _workdir._owner_record(os.getpid()) | {"pid": _dead_pid()}
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / _workdir.OWNER_FILE).write_text(json.dumps(owner))
    (tmp_path / "federation-link").symlink_to(other, target_is_directory=True)
    assert _workdir.remove_stale_workdirs(tmp_path) == []
    assert (other / _workdir.OWNER_FILE).exists()
