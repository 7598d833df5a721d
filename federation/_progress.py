"""Progress bars that are widgets in Jupyter and text in a terminal (``tqdm.auto``).

Library code that reports progress (training rounds, long sweeps) asks for a bar here, so
the choice of front end lives in one place:

    with progress_bar(total=rounds, desc="training", unit="round") as bar:
        for _ in range(rounds):
            ...
            bar.set_postfix_str("loss 0.41, ε 1.2")
            bar.update(1)
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar(Protocol):
    """The part of a ``tqdm`` bar that library code uses."""

    def update(self, n: float | None = 1) -> bool | None:
        """Advance by ``n`` steps."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Show ``s`` after the bar (e.g. the latest loss and ε spent)."""

    def close(self) -> None:
        """Finish the bar (leaves it on screen)."""

    def __enter__(self) -> ProgressBar:
        """Use as a context manager that closes the bar."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the bar."""


def progress_bar(
    total: int | None, desc: str, *, unit: str = "it", enabled: bool = True
) -> ProgressBar:
    """Return a progress bar: tqdm's notebook widget inside Jupyter, text on stderr elsewhere.

    Args:
        total: number of steps, or None if unknown.
        desc: label shown before the bar, e.g. ``"training"``.
        unit: what one step is, e.g. ``"round"``.
        enabled: False gives a bar that shows nothing (for quiet runs and servers).
    """
    # Imported here: tqdm.auto inspects the running IPython kernel when first imported.
    from tqdm.auto import tqdm

    bar: ProgressBar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=True)
    return bar
