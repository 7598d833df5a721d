"""What the CLI tells a user whose training job stopped (federation.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from federation.cli import _resume_hint
from federation.errors import BudgetExhaustedError, NodeUnavailableError


def _args(directory: Path | None, *, resume: bool) -> argparse.Namespace:
    return argparse.Namespace(command="train", checkpoint_dir=directory, resume=resume)


def test_a_stopped_job_with_a_checkpoint_is_told_how_to_continue(tmp_path: Path) -> None:
    assert _resume_hint(_args(tmp_path, resume=False)) == ""  # no checkpoint yet
    (tmp_path / "checkpoint.json").write_text("{}")
    assert _resume_hint(_args(tmp_path, resume=False)) == (
        f"; the last finished round is in {tmp_path}: add --resume to continue the job"
    )
    assert _resume_hint(_args(tmp_path, resume=True)).endswith(
        "run the same command again to continue the job"
    )
    assert _resume_hint(_args(None, resume=False)) == ""
    query = argparse.Namespace(command="query", checkpoint_dir=tmp_path, resume=False)
    assert _resume_hint(query) == ""


def test_after_a_refusal_the_hint_does_not_promise_that_running_again_continues(
    tmp_path: Path,
) -> None:
    (tmp_path / "checkpoint.json").write_text("{}")
    refused = _resume_hint(_args(tmp_path, resume=True), BudgetExhaustedError("no budget"))
    assert refused.endswith(
        ": once the cause above is fixed, run the same command again to continue the job"
    )
    down = _resume_hint(_args(tmp_path, resume=False), NodeUnavailableError("down"))
    assert down.endswith(": add --resume to continue the job")
