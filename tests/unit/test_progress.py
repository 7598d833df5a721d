"""Progress bars: text on stderr outside Jupyter (the widget is checked by test_notebooks)."""

from __future__ import annotations

import pytest

from federation._progress import progress_bar


def test_a_bar_counts_steps_and_shows_its_postfix(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(3, "training", unit="round") as bar:
        for _ in range(3):
            bar.set_postfix_str("loss 0.41")
            bar.update(1)
    err = capsys.readouterr().err
    assert "training" in err
    assert "3/3" in err
    assert "loss 0.41" in err


def test_a_disabled_bar_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(3, "training", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr() == ("", "")
