"""Write and read model weights as safetensors, streaming, and training checkpoints.

``write_safetensors`` writes the format (an 8-byte little-endian header length, a JSON
header of name -> dtype, shape and byte offsets, then the raw little-endian bytes) one
tensor at a time from the arrays' own memory: ``safetensors.numpy.save_file`` would first
copy the whole model into one ``bytes`` object, a second model-sized allocation. Files load
with ``safetensors.torch.load_file`` (tests check it).

A checkpoint directory holds ``round-NNNNN.safetensors`` (global weights under ``weights/``
and the server optimizer's moments under ``m/`` and ``v/``) and ``checkpoint.json``, which
names that file and carries everything else (spec, settings, history, receipts). Each is
written to a temporary name, flushed to disk (``fsync``) and renamed, weights first, and
the directory is synced after each rename: the JSON is the commit point, and the previous
round's weights are deleted only once the new JSON is durable, so a crash or a power loss
leaves the previous checkpoint or the new one, never neither.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import safe_open

from federation.errors import ConfigError, InvalidRequestError

__all__ = [
    "CHECKPOINT_FILE",
    "check_output_file",
    "load_checkpoint",
    "prepare_checkpoint_dir",
    "read_safetensors",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.json"
log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "federation-training-checkpoint"
CHECKPOINT_VERSION = 1
_TENSORS_NAME = re.compile(r"round-[0-9]{5,}\.safetensors")

Arrays = Mapping[str, npt.NDArray[np.float32]]
Loaded = dict[str, npt.NDArray[np.float32]]


def write_safetensors(
    path: Path, arrays: Arrays, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write float32 ``arrays`` to ``path`` as safetensors, atomically, without a full copy."""
    header: dict[str, object] = {}
    offset = 0
    for name, array in arrays.items():
        size = array.size * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays.values():
            f.write(np.ascontiguousarray(array, dtype="<f4").reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def write_text_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably: temporary file, fsync, rename,
    then fsync the directory (so the rename itself survives a power loss)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable, where the OS can."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles (Windows): the rename is all there is
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; nothing more can be done
    finally:
        os.close(fd)


def read_safetensors(path: Path, *, prefix: str = "") -> dict[str, npt.NDArray[np.float32]]:
    """Read the float32 tensors of a safetensors file whose names start with ``prefix``.

    Returns:
        Name (without the prefix) -> array, in the file's order.

    Raises:
        ConfigError: the file is unreadable, or a tensor is not float32.
    """
    out: dict[str, npt.NDArray[np.float32]] = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not name.startswith(prefix):
                    continue
                array = f.get_tensor(name)
                if array.dtype != np.float32:
                    raise ConfigError(f"{path}: tensor {name!r} is {array.dtype}, not float32")
                out[name[len(prefix) :]] = np.asarray(array, order="C")  # 0-d stays 0-d
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read safetensors file {path}: {err}") from err
    return out


def _probe(path: Path, what: str) -> None:
    """Create and remove ``path``: what writing the real file later needs."""
    try:
        with path.open("wb"):
            pass
        path.unlink()
    except OSError as err:
        raise InvalidRequestError(f"{what}: cannot write {path}: {err.strerror or err}") from err


def check_output_file(path: Path, *, what: str = "out") -> None:
    """Check, before a job spends budget, that a file can later be written at ``path``.

    Raises:
        InvalidRequestError: ``path`` is a directory, its folder is missing, or it cannot
            be written there.
    """
    if path.is_dir():
        raise InvalidRequestError(f"{what}: {path} is a directory; name a file")
    if path.parent.exists() and not path.parent.is_dir():
        raise InvalidRequestError(f"{what}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise InvalidRequestError(f"{what}: folder {path.parent} does not exist")
    _probe(path.with_name(path.name + ".tmp"), what)


def prepare_checkpoint_dir(directory: Path, *, resume: bool) -> None:
    """Create ``directory`` and check it is writable, before the first round is charged.

    Without ``resume`` a checkpoint already there is refused rather than overwritten: it
    is the only way to continue that job (whose rounds the nodes have charged).

    Raises:
        InvalidRequestError: a checkpoint is there and ``resume`` is False, or the
            directory cannot be created or written.
    """
    existing = directory / CHECKPOINT_FILE
    if resume and not existing.exists():
        return  # nothing to resume: loading it says so, and nothing is created
    if not resume and existing.exists():
        raise InvalidRequestError(
            f"{directory} already holds a training checkpoint ({CHECKPOINT_FILE}); resume "
            "it (--resume, resume=True) or choose another checkpoint directory"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidRequestError(
            f"checkpoint directory {directory}: cannot create it: {err.strerror or err}"
        ) from err
    _probe(directory / ".write-test.tmp", "checkpoint directory")


LOCK_FILE = ".lock"


@contextmanager
def checkpoint_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock while a job writes its checkpoints there.

    Two jobs resuming from one directory would each write round files and delete the
    other's, leaving ``checkpoint.json`` naming a deleted file (and both would charge the
    nodes for the same rounds). An advisory ``flock`` on ``.lock``, released when the job
    ends or its process dies; on a system without ``fcntl`` there is no lock.

    Raises:
        InvalidRequestError: another job holds the lock (nothing has been charged).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequestError(
                f"checkpoint directory {directory} is in use by another training job (it "
                f"holds {LOCK_FILE}); wait for that job to end, or choose another directory; "
                "nothing was charged"
            ) from None
        except OSError as err:  # ENOLCK: a file system without locks (some NFS mounts)
            log.warning("checkpoint directory %s cannot be locked (%s): not locked", directory, err)
        yield
    finally:
        os.close(fd)


def save_checkpoint(
    directory: Path,
    *,
    round_index: int,
    weights: Arrays,
    optimizer_state: Arrays,
    document: Mapping[str, object],
) -> Path:
    """Write the checkpoint after round ``round_index`` (0-based); return the JSON's path."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors_name = f"round-{round_index:05d}.safetensors"
    tensors = {f"weights/{n}": a for n, a in weights.items()}
    tensors.update(optimizer_state)
    write_safetensors(directory / tensors_name, tensors)
    body = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "round": round_index,
        "tensors_file": tensors_name,
        **document,
    }
    path = directory / CHECKPOINT_FILE
    write_text_durably(path, json.dumps(body, indent=1, sort_keys=True))
    # The checkpoint is complete: an older round's file left behind only takes space.
    for old in directory.glob("round-*.safetensors"):
        if old.name != tensors_name:
            try:
                old.unlink(missing_ok=True)
            except OSError as err:
                log.warning("checkpoint: could not remove %s: %s", old, err)
    return path


def load_checkpoint(directory: Path) -> tuple[dict[str, object], Loaded, Loaded]:
    """Read a checkpoint: its JSON document, the global weights and the optimizer state.

    Raises:
        ConfigError: no checkpoint there, or it is unreadable or of another format.
    """
    path = directory / CHECKPOINT_FILE
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"no checkpoint to resume from: {path} does not exist") from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(body, dict) or body.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a federation training checkpoint")
    if body.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: checkpoint version {body.get('version')!r} is not supported")
    name = body.get("tensors_file")
    if not isinstance(name, str) or not _TENSORS_NAME.fullmatch(name):
        # Only a file this directory's checkpoints write: never a path to another job's.
        raise ConfigError(f"{path}: tensors_file {name!r} is not a round-NNNNN.safetensors name")
    tensors = directory / name
    weights = read_safetensors(tensors, prefix="weights/")
    state = {
        name: array
        for prefix in ("m/", "v/")
        for name, array in (
            (prefix + n, a) for n, a in read_safetensors(tensors, prefix=prefix).items()
        )
    }
    return body, weights, state
