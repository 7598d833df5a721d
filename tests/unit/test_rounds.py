"""Tests of nodes.rounds.SpareBuffers: one round's buffers kept for the next round."""

from __future__ import annotations

import time

import numpy as np

from federation.wire import TensorHeader
from nodes.rounds import SpareBuffers

HEADERS = (TensorHeader("w", (3, 4)), TensorHeader("b", (4,)))


def _buffers() -> dict[str, np.ndarray]:
    return {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def test_buffers_given_back_are_taken_once_by_a_round_of_the_same_layout() -> None:
    spare = SpareBuffers()
    given = _buffers()
    spare.give(given)
    taken = spare.take(HEADERS)
    assert taken is not None
    assert all(taken[name] is given[name] for name in given)
    assert spare.take(HEADERS) is None  # taken: two rounds never share buffers
    assert not spare.holding


def test_a_round_of_another_layout_gets_nothing_and_the_buffers_are_dropped() -> None:
    spare = SpareBuffers()
    spare.give(_buffers())
    assert spare.take((TensorHeader("w", (4, 3)), TensorHeader("b", (4,)))) is None
    assert not spare.holding  # not kept for a layout that has moved on


def test_held_buffers_are_dropped_when_no_round_comes() -> None:
    spare = SpareBuffers(idle_s=0.05)
    spare.give(_buffers())
    deadline = time.monotonic() + 10  # a bound on waiting, not a timing assertion
    while spare.holding:
        assert time.monotonic() < deadline, "the idle buffers were never dropped"
        time.sleep(0.01)
    assert spare.take(HEADERS) is None


def test_a_stale_idle_timer_does_not_drop_buffers_given_after_it() -> None:
    # The idle timer of the first give() fires just as a second give() replaces the buffers
    # (Timer.cancel cannot stop one already running): the new buffers stay.
    spare = SpareBuffers()
    spare.give(_buffers())
    spare.give(_buffers())
    spare._drop(1)  # the first give's timer, arriving late
    assert spare.holding
    spare._drop(2)  # the second give's own timer does drop them
    assert not spare.holding


def test_closing_drops_the_buffers_and_the_timer() -> None:
    spare = SpareBuffers()
    spare.give(_buffers())
    spare.close()
    assert not spare.holding
    assert spare.take(HEADERS) is None
    spare.give(_buffers())  # a round that outlived the node's stop gives back nothing
    assert not spare.holding
