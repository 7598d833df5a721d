"""Temporary work dirs for ``LocalFederation``, and removal of those a killed process left.

A process that exits normally, or is interrupted, removes its work dir (``LocalFederation``
stops on exit, on garbage collection and at interpreter exit). A process killed outright
(``SIGKILL``, the OOM killer, a Jupyter kernel that is force-restarted) runs no code, so its
dir stays behind; its node processes still stop (they watch the launcher's pid). Each dir
therefore records its owner in ``owner.json``, and the next ``LocalFederation`` removes any
``federation-*`` dir whose owner has exited.

Removal is conservative: only dirs of this user, with a readable owner record from the same
PID namespace, whose owner process is gone (or whose PID now belongs to a process started at
another time). Anything it cannot decide is left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["OWNER_FILE", "PREFIX", "make_workdir", "remove_stale_workdirs"]

log = logging.getLogger(__name__)

PREFIX = "federation-"
OWNER_FILE = "owner.json"


def make_workdir() -> Path:
    """Create a fresh temp dir owned by this process, first removing stale ones."""
    parent = Path(tempfile.gettempdir())
    remove_stale_workdirs(parent)
    root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    try:
        (root / OWNER_FILE).write_text(json.dumps(_owner_record(os.getpid())) + "\n")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def remove_stale_workdirs(parent: Path | None = None) -> list[Path]:
    """Remove ``federation-*`` work dirs under ``parent`` whose owner process has exited.

    Args:
        parent: where to look (default: the system temp dir, as ``make_workdir`` uses).

    Returns:
        The dirs removed.
    """
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    removed = []
    for path in sorted(parent.glob(PREFIX + "*")):
        owner = _read_owner(path)
        if owner is None or _is_alive(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s: the process that made it (pid %s) has exited", path, owner["pid"])
        removed.append(path)
    return removed


def _read_owner(path: Path) -> dict[str, object] | None:
    """Return the owner record of one of our dirs, or None if it is not clearly ours."""
    try:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return None
        owner = json.loads((path / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    # PIDs mean nothing across PID namespaces (containers sharing /tmp): leave such dirs.
    if owner.get("pid_namespace") != _pid_namespace():
        return None
    return owner


def _is_alive(owner: dict[str, object]) -> bool:
    pid = owner["pid"]
    assert isinstance(pid, int)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process has that PID now; it exists
    proc = _proc_stat(pid)
    if proc is None:
        return True
    state, started = proc
    if state == "Z":
        return False  # exited, not yet reaped by its parent
    # A different start time means the PID was reused by another process.
    return owner.get("start_ticks") in (None, started)


def _owner_record(pid: int) -> dict[str, object]:
    proc = _proc_stat(pid)
    return {
        "pid": pid,
        "start_ticks": None if proc is None else proc[1],
        "pid_namespace": _pid_namespace(),
    }


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The process's state letter and start time (clock ticks since boot); None off Linux."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path(f"/proc/{pid}/stat").read_text()
        # Fields 3 and 22, counted after the command name, which is in parentheses and may
        # itself hold spaces or parentheses.
        fields = text.rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    return None


def _pid_namespace() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return None
