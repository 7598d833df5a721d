"""Combine streamed model updates in bounded memory, then take a server optimizer step.

``RunningSum`` adds each node's update into one weighted sum *as its chunks arrive*, so the
coordinator never holds a whole update: memory is the global weights, this sum, the
adaptive optimizer's two moments (FedAdam / FedYogi only) and one chunk per node in flight.

A node whose stream breaks mid-update has already added a prefix of each tensor (chunks of
a tensor arrive in order). That prefix cannot be taken back without storing it, so it is
kept and averaged *per coordinate*: each element is divided by the total weight of the
nodes whose chunks covered it. Every coordinate is then a weighted mean of the updates that
arrived for it, which is still post-processing of DP releases.

Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", arXiv:2003.00295,
Algorithm 2), with ``delta = average - global`` (the negated pseudo-gradient):

- ``fedavg``:  ``x += lr * delta`` (``lr = 1``: the weighted average itself);
- ``fedadam``: ``m = b1 m + (1 - b1) delta``; ``v = b2 v + (1 - b2) delta**2``;
  ``x += lr * m / (sqrt(v) + tau)``;
- ``fedyogi``: as ``fedadam`` but ``v = v - (1 - b2) delta**2 * sign(v - delta**2)``.

Moments start at ``m = 0`` and ``v = tau**2`` as in the paper; no bias correction.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from federation.errors import InvalidRequestError

__all__ = [
    "BETA1",
    "MAX_SERVER_LR",
    "BETA2",
    "TAU",
    "Contribution",
    "RunningSum",
    "ServerOptimizer",
    "ServerOptimizerName",
]

Arrays = dict[str, npt.NDArray[np.float32]]
ServerOptimizerName = Literal["fedavg", "fedadam", "fedyogi"]

BETA1 = 0.9
BETA2 = 0.99
TAU = 1e-3
_BLOCK = 1 << 20  # elements per in-place block: bounds the temporaries of an update step
# Elements per step of adding a chunk into the sum: the scaled temporary (64 KiB) stays in
# cache, so the add is one pass over memory (2x faster than ``+= values * w`` at 2 MiB).
_ADD_BLOCK = 1 << 14
_MAX_WEIGHT = 1e18  # a noisy record count; float32 reaches 3.4e38
MAX_SERVER_LR = 1e6  # far past any useful step; keeps lr (and lr / tau) inside float32
TAU_RANGE = (1e-12, 1e6)  # tau**2, v's start, must stay a normal float32 (> 0)
_DELTA_BOUND = 1e18  # |avg - x| up to this keeps delta**2 (and v) below 1e36
_STEP_BOUND = 1e30  # weights and steps below this cannot sum past float32's 3.4e38


def _blocks(size: int) -> Iterator[slice]:
    for start in range(0, size, _BLOCK):
        yield slice(start, min(start + _BLOCK, size))


class RunningSum:
    """A weighted sum of model updates, filled chunk by chunk from concurrent streams."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Allocate one float32 accumulator per tensor (zeros)."""
        self.shapes = dict(shapes)
        self.sums = {n: np.zeros(math.prod(s), dtype=np.float32) for n, s in shapes.items()}
        self._lock = threading.Lock()
        self._scratch = np.empty(_ADD_BLOCK, dtype=np.float32)  # used under the lock
        self.complete_weight = 0.0
        self._partial: list[tuple[dict[str, int], float]] = []

    def reset(self) -> None:
        """Zero the sums for the next round (the memory is reused)."""
        for flat in self.sums.values():
            flat.fill(0.0)
        self.complete_weight = 0.0
        self._partial = []

    def contribution(self, weight: float) -> Contribution:
        """Start adding one node's update with ``weight`` (> 0)."""
        # The sums are float32: a weight past its range would scale every value to inf.
        if not (math.isfinite(weight) and 0 < weight <= _MAX_WEIGHT):
            raise InvalidRequestError(
                f"an update's weight must be > 0 and <= {_MAX_WEIGHT:g}; got {weight}"
            )
        return Contribution(self, weight)

    def add(self, name: str, offset: int, values: npt.NDArray[np.float32], weight: float) -> None:
        """Add ``weight * values`` at element ``offset`` of tensor ``name``."""
        scale = np.float32(weight)
        # Overflow (finite but huge values) is caught, with its tensor named, in average().
        with self._lock, np.errstate(over="ignore", invalid="ignore"):
            target = self.sums[name][offset : offset + values.size]
            for start in range(0, values.size, _ADD_BLOCK):
                stop = min(start + _ADD_BLOCK, values.size)
                scaled = np.multiply(values[start:stop], scale, out=self._scratch[: stop - start])
                np.add(target[start:stop], scaled, out=target[start:stop])

    def _finish(self, contribution: Contribution, *, complete: bool) -> None:
        with self._lock:
            if complete:
                self.complete_weight += contribution.weight
            elif any(contribution.received.values()):
                self._partial.append((dict(contribution.received), contribution.weight))

    @property
    def has_partial(self) -> bool:
        """Whether a broken stream left a prefix of some tensor in the sums."""
        return bool(self._partial)

    def average(self, fallback: Mapping[str, npt.NDArray[np.float32]]) -> Arrays:
        """Turn the sums into per-coordinate weighted means, in place, and return them.

        A coordinate no update reached takes its value from ``fallback`` (the global
        weights), so it does not move.

        Raises:
            InvalidRequestError: the mean is not finite. Every chunk was finite, but finite
                float32 values (huge, from a faulty or hostile node) can overflow once
                weighted and summed; stepping would make the global model NaN.
        """
        for name, flat in self.sums.items():
            size = flat.size
            cuts = {0, size}
            for received, _ in self._partial:
                cuts.add(min(received.get(name, 0), size))
            points = sorted(cuts)
            for start, stop in zip(points, points[1:], strict=False):
                covered = sum(w for received, w in self._partial if received.get(name, 0) >= stop)
                total = self.complete_weight + covered
                if total > 0:
                    scale = np.float32(total)
                    for block in _blocks(stop - start):
                        part = flat[start + block.start : start + block.stop]
                        part /= scale
                        # While the block is in cache: the sum of a block is finite iff
                        # its values are (short of sums past 3e38, itself a faulty update).
                        with np.errstate(over="ignore", invalid="ignore"):
                            finite = math.isfinite(float(part.sum()))
                        if not finite:
                            raise InvalidRequestError(
                                f"the round's average of tensor {name!r} is not finite "
                                "(NaN or overflow): a node sent values too large to combine"
                            )
                else:
                    flat[start:stop] = fallback[name].reshape(-1)[start:stop]
        return {name: flat.reshape(self.shapes[name]) for name, flat in self.sums.items()}


@dataclass
class Contribution:
    """One node's update being added to a ``RunningSum``; a ``ChunkSink``."""

    total: RunningSum
    weight: float
    received: dict[str, int] = field(default_factory=dict)  # elements received per tensor

    def __call__(self, name: str, offset: int, values: npt.NDArray[np.float32]) -> None:
        """Add one checked chunk (chunks of a tensor arrive in order)."""
        self.total.add(name, offset, values, self.weight)
        self.received[name] = offset + values.size

    def complete(self) -> None:
        """The whole update arrived: count its weight everywhere."""
        self.total._finish(self, complete=True)

    def abandon(self) -> None:
        """The stream broke: count its weight only where its chunks arrived."""
        self.total._finish(self, complete=False)


class ServerOptimizer:
    """Moves the global weights towards the round's average (FedAvg, FedAdam, FedYogi)."""

    def __init__(
        self,
        name: ServerOptimizerName,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        lr: float,
        beta1: float = BETA1,
        beta2: float = BETA2,
        tau: float = TAU,
    ) -> None:
        """Allocate the moments an adaptive optimizer needs (none for FedAvg).

        Raises:
            InvalidRequestError: unknown name, or a hyper-parameter out of range.
        """
        if name not in ("fedavg", "fedadam", "fedyogi"):
            raise InvalidRequestError(
                f"server_optimizer must be fedavg, fedadam or fedyogi; got {name!r}"
            )
        if not (math.isfinite(lr) and 0 < lr <= MAX_SERVER_LR):
            raise InvalidRequestError(
                f"server_lr must be a number > 0 and <= {MAX_SERVER_LR:g}; got {lr!r}"
            )
        if not (
            0 <= beta1 < 1
            and 0 <= beta2 < 1
            and math.isfinite(tau)
            and TAU_RANGE[0] <= tau <= TAU_RANGE[1]
        ):
            raise InvalidRequestError(
                f"server betas must be in [0, 1) and tau in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}]"
            )
        self.name = name
        self.lr = lr
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.state: Arrays = {}
        if name != "fedavg":
            for n, s in shapes.items():
                self.state[f"m/{n}"] = np.zeros(s, dtype=np.float32)
                self.state[f"v/{n}"] = np.full(s, tau * tau, dtype=np.float32)

    def step(self, weights: Arrays, average: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Update ``weights`` (and the moments) in place from the round's ``average``.

        All or nothing: a finite average can still step to a value float32 cannot hold (a
        huge ``delta``, whose square FedAdam/FedYogi keep in ``v``, or FedAvg's
        ``x + lr (avg - x)`` at ``lr > 1``). Such a step would leave infinite moments (every
        later step of those coordinates stalls) or NaN weights (which the checkpoint would
        then keep), so nothing is applied unless the whole step is finite:

        - FedAvg at ``lr = 1`` takes the (checked) average, and at ``lr < 1`` the convex
          combination ``(1 - lr) x + lr avg``: finite for finite inputs, no check needed
          (``x + lr (avg - x)`` is not: ``avg - x`` can overflow).
        - Otherwise one read-only pass bounds the step (``|avg - x|``, ``|x|`` and ``|m|``);
          within the bounds it provably stays finite, and only past them is the whole step
          computed once on block-sized copies and checked before it is applied.

        Raises:
            InvalidRequestError: the step is not finite somewhere; nothing was changed.
        """
        if not (self.name == "fedavg" and self.lr <= 1) and not self._bounded(weights, average):
            for name, x in weights.items():
                if not self._apply(name, x, average[name], commit=False):
                    raise InvalidRequestError(
                        f"the server step ({self.name}, lr {self.lr:g}) on tensor {name!r} "
                        "is not finite in float32 (an average far from the global weights)"
                    )
        for name, x in weights.items():
            self._apply(name, x, average[name], commit=True)

    def _bounded(self, weights: Arrays, average: Mapping[str, npt.NDArray[np.float32]]) -> bool:
        """Whether the step provably stays finite: ``|delta| <= 1e18`` (so ``delta**2``,
        and ``v`` after it, stay below 1e36) and ``|x|`` and the step below 1e30. The step is
        at most ``lr * max(|delta|, |m|) / tau`` (adaptive: ``|m|`` is a running average of
        deltas and ``sqrt(v) + tau >= tau``) or ``lr * |delta|`` (FedAvg)."""
        adaptive = self.name != "fedavg"
        # As the step computes them (float32), and lr * m before it is divided by tau.
        lr, tau = float(np.float32(self.lr)), float(np.float32(self.tau))
        gain = max(lr, lr / tau) if adaptive else lr
        scratch = np.empty(
            min(_BLOCK, max((a.size for a in weights.values()), default=0)), np.float32
        )
        with np.errstate(over="ignore", invalid="ignore"):
            for name, x in weights.items():
                flat_x, flat_avg = x.reshape(-1), average[name].reshape(-1)
                m = self.state[f"m/{name}"].reshape(-1) if adaptive else None
                for b in _blocks(flat_x.size):
                    delta = np.subtract(flat_avg[b], flat_x[b], out=scratch[: b.stop - b.start])
                    change = float(np.abs(delta).max(initial=0.0))
                    moment = 0.0 if m is None else float(np.abs(m[b]).max(initial=0.0))
                    size = float(np.abs(flat_x[b]).max(initial=0.0))
                    # NaN fails every comparison below, so a NaN anywhere is not bounded.
                    if not (change <= _DELTA_BOUND and moment <= _DELTA_BOUND):
                        return False
                    if not (max(change, moment) * gain < _STEP_BOUND and size < _STEP_BOUND):
                        return False
        return True

    def _apply(
        self,
        name: str,
        x: npt.NDArray[np.float32],
        average: npt.NDArray[np.float32],
        *,
        commit: bool,
    ) -> bool:
        """Step one tensor block by block: in place, or on copies (returns whether finite)."""
        flat_x = x.reshape(-1)
        flat_avg = average.reshape(-1)
        if self.name == "fedavg" and self.lr == 1:
            if commit:
                np.copyto(flat_x, flat_avg)  # the average itself (checked finite)
            return True
        moments = self.name != "fedavg"
        m = self.state[f"m/{name}"].reshape(-1) if moments else flat_x
        v = self.state[f"v/{name}"].reshape(-1) if moments else flat_x
        for b in _blocks(flat_x.size):
            xb, mb, vb = flat_x[b], m[b], v[b]
            if not commit:
                xb, mb, vb = xb.copy(), mb.copy(), vb.copy()
            with np.errstate(over="ignore", invalid="ignore"):
                if moments:
                    self._adaptive(xb, flat_avg[b], mb, vb)
                elif self.lr < 1:  # (1 - lr) x + lr avg: a convex combination, never overflows
                    torch.from_numpy(xb).mul_(1.0 - self.lr).add_(
                        torch.from_numpy(flat_avg[b]), alpha=self.lr
                    )
                else:  # lr > 1: extrapolation, checked on a copy first
                    torch.from_numpy(xb).lerp_(torch.from_numpy(flat_avg[b]), self.lr)
            if not commit and not all(
                math.isfinite(float(t.sum(dtype=np.float64))) for t in (xb, mb, vb)
            ):
                return False
        return True

    def _adaptive(
        self,
        x: npt.NDArray[np.float32],
        avg: npt.NDArray[np.float32],
        m: npt.NDArray[np.float32],
        v: npt.NDArray[np.float32],
    ) -> None:
        delta = avg - x
        m *= np.float32(self.beta1)
        m += np.float32(1 - self.beta1) * delta
        square = delta * delta
        if self.name == "fedadam":
            v *= np.float32(self.beta2)
            v += np.float32(1 - self.beta2) * square
        else:
            v -= np.float32(1 - self.beta2) * square * np.sign(v - square)
        x += np.float32(self.lr) * m / (np.sqrt(v) + np.float32(self.tau))

    def hyperparameters(self) -> dict[str, object]:
        """The optimizer's settings (for checkpoints)."""
        return {
            "name": self.name,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }
