"""``python -m nodes`` sets up the process before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Runs the node entry point as ``python -m nodes --help`` does, then reports what the
# process saw: the wait policy, and whether torch was already loaded when it was set.
_PROBE = """
import os, runpy, sys
seen = {}
real_setdefault = os.environ.setdefault
def spy(key, value):
    seen[key] = "torch" in sys.modules
    return real_setdefault(key, value)
os.environ.setdefault = spy
sys.argv = ["nodes", "--help"]
try:
    runpy.run_module("nodes", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"), seen.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_node_threads_wait_passively_unless_the_operator_says_otherwise(
    given: str | None, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = (
        subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
        )
        .stdout.splitlines()[-1]
        .split()
    )
    # Set to the expected value, before torch was imported, and torch does load after it.
    assert out == [expected, "False", "True"]
