"""The committed generated code matches its .proto source, and the public API is tidy."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import federation

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("federation/_proto/v1/node.proto")  # relative to the include root protos/
GENERATED = ("node_pb2.py", "node_pb2_grpc.py", "node_pb2.pyi")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            PROTO.as_posix(),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out / PROTO.parent


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_is_fresh(regenerated: Path, name: str) -> None:
    committed = ROOT / PROTO.parent / name
    assert committed.exists(), f"{committed} is missing: run `make protos`"
    fresh = (regenerated / name).read_bytes()
    assert committed.read_bytes() == fresh, "generated code is stale: run `make protos`"


def test_public_api() -> None:
    names = federation.__all__
    assert list(names) == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(federation, name), f"federation.__all__ names {name!r}, which is missing"
    exported = {
        name
        for name, value in vars(federation).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported <= set(names), "a public name of federation is missing from __all__"
