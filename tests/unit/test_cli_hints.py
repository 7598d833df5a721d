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


def test_the_train_help_states_the_server_lr_bound_the_coordinator_enforces() -> None:
    from federation._train_cli import add_train_parser
    from federation.coordinator._aggregate import MAX_SERVER_LR

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    help_text = " ".join(train.format_help().split())
    assert f"<= {MAX_SERVER_LR:g};" in help_text
    assert "(default: all)" in help_text
