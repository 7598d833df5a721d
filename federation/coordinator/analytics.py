"""Combine the DP releases of several nodes into one estimate with a confidence interval.

Combining is post-processing of DP releases, so it costs no privacy. Rules:

* count, sum, histogram bins: add the nodes' noisy values. The noise of each node is known
  (mechanism and scale are public), so the sum of noises has a known distribution ``N`` and
  ``truth = estimate - N``; the interval takes N's 2.5% and 97.5% quantiles (simulated from
  the same discrete samplers the nodes use). Exact coverage of the DP noise.
* mean: ``(sum_i S_i + center_i * C_i) / sum_i C_i`` over the nodes' noisy centred sums S_i
  and noisy counts C_i (the ratio of totals, not an average of node means, so a node with
  more records weighs more). Interval: parametric bootstrap, the percentiles of the same
  ratio recomputed on ``observed - simulated noise``.
* quantile: the nodes' noisy histograms over the same public bins are added, their
  cumulative counts made monotone (``_monotone_cdf``: no per-bin clipping, which would
  bias every quantile), and the quantile read off them with linear interpolation inside a
  bin. Interval: a simultaneous confidence band on the cumulative counts
  (``_quantile_band``), ending on bin edges (inside a bin the histogram cannot place the
  records): it covers the records' quantile at least at the stated rate, whatever the
  noise or the data size.

The intervals cover the DP noise: they contain the exact statistic *of the nodes' data*
with the stated probability (not a population parameter: sampling error is not included).

A value a node suppressed (NaN: its consumer policy's ``min_cohort`` guard withheld a group
or bin whose noisy count was small) is suppressed in the result too, never combined from the
other nodes alone: its ``Estimate`` is all NaN and ``Estimate.suppressed`` is true.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from federation._html import query_result_html
from federation.errors import SchemaMismatchError
from federation.privacy import sample_discrete_gaussian, sample_discrete_laplace
from federation.queries import Count, Histogram, Mean, Mechanism, Quantile, Query, Sum
from federation.receipts import ReceiptRecord
from federation.releases import GroupRelease, Measurement, Receipt, Release

__all__ = ["Estimate", "GroupResult", "NodeSpend", "QueryResult", "combine"]

SIMULATIONS = 4000
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Estimate:
    """A DP estimate and its confidence interval (all NaN when suppressed)."""

    value: float
    low: float
    high: float

    @property
    def suppressed(self) -> bool:
        """Whether a node withheld this value (its ``min_cohort`` guard; see nodes.cohort)."""
        return math.isnan(self.value)


SUPPRESSED = Estimate(value=math.nan, low=math.nan, high=math.nan)


@dataclass(frozen=True, slots=True)
class GroupResult:
    """The estimates of one group: one value, or one per bin / per quantile."""

    group: str
    estimates: tuple[Estimate, ...]


@dataclass(frozen=True, slots=True)
class NodeSpend:
    """What one node charged for a query, the consumer's budget left there, and the receipt.

    ``receipt`` is the node's signed receipt, ``released`` the node's released values as
    ``federation.receipts.release_payload`` builds them (their digest is in the receipt),
    and ``node_key_pem`` the node's receipt-verification certificate or key (from
    Describe): together what ``federation receipts verify`` checks.
    """

    node: str
    epsilon: float
    delta: float
    spent_epsilon: float
    remaining_epsilon: float
    receipt_id: str
    receipt: Receipt | None = None
    released: Mapping[str, object] | None = None
    node_key_pem: str = ""

    def receipt_record(self) -> ReceiptRecord | None:
        """The receipt with what it covers, as stored and verified (None if no receipt)."""
        if self.receipt is None or self.released is None:
            return None
        return ReceiptRecord(self.node, self.receipt, self.released, self.node_key_pem)


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A federated answer: combined estimates per group, and per-node costs."""

    query: Query
    labels: tuple[str, ...]
    groups: tuple[GroupResult, ...]
    nodes: tuple[NodeSpend, ...]
    missing: tuple[str, ...] = ()
    confidence: float = 0.95
    notes: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        """``count``, ``sum``, ``mean``, ``histogram`` or ``quantile``."""
        return type(self.query).__name__.lower()

    def estimate(self, group: str = "") -> Estimate:
        """The (first) estimate of ``group``; "" is the whole cohort without group-by."""
        for g in self.groups:
            if g.group == group:
                return g.estimates[0]
        raise KeyError(f"no group {group!r}; groups: {[g.group for g in self.groups]}")

    @property
    def value(self) -> float:
        """The single estimate of an ungrouped count, sum or mean."""
        return self.estimate(self.groups[0].group).value

    def to_html(self, *, truth: Mapping[str, Sequence[float]] | None = None) -> str:
        """An HTML table of the estimates and intervals, and each node's cost and receipt.

        Args:
            truth: exact values to show beside the estimates, ``{group: [one per label]}``;
                only for synthetic data, where they are known (as in ``federation demo``).
        """
        return query_result_html(self, truth=truth)

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (used by ``federation query --json``)."""
        return {
            "query": self.kind,
            "confidence": self.confidence,
            "labels": list(self.labels),
            "groups": [
                {
                    "group": g.group,
                    "estimates": [
                        _estimate_dict(label, e)
                        for label, e in zip(self.labels, g.estimates, strict=True)
                    ],
                }
                for g in self.groups
            ],
            "nodes": [
                {
                    "node": n.node,
                    "epsilon_charged": n.epsilon,
                    "delta_charged": n.delta,
                    "spent_epsilon": n.spent_epsilon,
                    "remaining_epsilon": n.remaining_epsilon,
                    "receipt_id": n.receipt_id,
                    **_receipt_fields(n),
                }
                for n in self.nodes
            ],
            "missing_nodes": list(self.missing),
        }


def _receipt_fields(spend: NodeSpend) -> dict[str, object]:
    """``receipt``, ``released`` and ``node_key`` of a node's entry in ``to_dict``."""
    record = spend.receipt_record()
    if record is None:
        return {}
    stored = record.to_dict()
    return {key: stored[key] for key in ("receipt", "released", "node_key")}


def combine(
    query: Query,
    releases: Mapping[str, Release],
    *,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
    bounds: tuple[float, float] | None = None,
) -> tuple[tuple[str, ...], tuple[GroupResult, ...]]:
    """Combine per-node releases of ``query`` into labels and per-group estimates.

    Args:
        query: the query all releases answer.
        releases: node name -> that node's release (at least one).
        confidence: interval coverage, e.g. 0.95.
        rng: generator for the noise simulations (seeded for reproducible intervals).
        bounds: a mean's public column bounds: the mean and its interval are clamped to
            them (post-processing; the true mean is inside them). None: not clamped.

    Returns:
        The labels of the estimates (bins, quantiles, or the statistic's name) and one
        ``GroupResult`` per group, in the public domain's order.
    """
    rng = rng if rng is not None else np.random.default_rng()
    alpha = (1.0 - confidence) / 2.0
    _check_aligned(releases)
    first = next(iter(releases.values()))
    group_names = [g.group for g in first.groups]
    by_group = {
        name: [_group(release, name) for release in releases.values()] for name in group_names
    }
    if isinstance(query, Quantile):
        labels = tuple(f"q{q:g}" for q in query.quantiles)
        edges = np.asarray(first.bin_edges, dtype=np.float64)
        results = tuple(
            GroupResult(name, _quantiles(parts, edges, query.quantiles, alpha, rng))
            for name, parts in by_group.items()
        )
        return labels, results
    if isinstance(query, Histogram):
        results = tuple(
            GroupResult(name, _additive([p.measurement("bins") for p in parts], alpha, rng))
            for name, parts in by_group.items()
        )
        return first.bin_labels, results
    if isinstance(query, Mean):
        results = tuple(
            GroupResult(name, (_clamped(_mean(parts, alpha, rng), bounds),))
            for name, parts in by_group.items()
        )
        return ("mean",), results
    assert isinstance(query, Count | Sum)
    name = "count" if isinstance(query, Count) else "sum"
    results = tuple(
        GroupResult(group, _additive([p.measurement(name) for p in parts], alpha, rng))
        for group, parts in by_group.items()
    )
    return (name,), results


def _check_aligned(releases: Mapping[str, Release]) -> None:
    """Refuse to add up releases whose groups or bins differ (their schemas did).

    Labels are not compared: they only name the bins (nodes from before 2026-12-06 wrote
    the last one half-open, "[75, 100)"), and the first release's are shown.

    Raises:
        SchemaMismatchError: a release's groups or bin edges are not the first's (naming
            both nodes).
    """
    (first_node, first), *rest = releases.items()

    def layout(release: Release) -> tuple[object, ...]:
        return (
            frozenset(g.group for g in release.groups),  # matched by name, in any order
            tuple(release.bin_edges),
        )

    for node, release in rest:
        if layout(release) != layout(first):
            raise SchemaMismatchError(
                f"node {node!r} released other groups or bins than node {first_node!r} "
                "(their schemas of the dataset differ): the releases cannot be added up"
            )


def _estimate_dict(label: str, e: Estimate) -> dict[str, object]:
    """One estimate for JSON: a suppressed one has nulls (JSON has no NaN)."""
    if e.suppressed:
        return {"label": label, "value": None, "ci_low": None, "ci_high": None, "suppressed": True}
    return {"label": label, "value": e.value, "ci_low": e.low, "ci_high": e.high}


def _suppressed_anywhere(parts: Sequence[Measurement]) -> npt.NDArray[np.bool_]:
    """Per value: whether any node suppressed it (released NaN, its min_cohort guard).

    A value withheld by one node is withheld from the combination too: adding the other
    nodes' numbers alone would silently answer for a smaller population.
    """
    values = np.array([m.values for m in parts], dtype=np.float64)
    return np.asarray(np.isnan(values).any(axis=0), dtype=np.bool_)


def _group(release: Release, name: str) -> GroupRelease:
    for g in release.groups:
        if g.group == name:
            return g
    raise ValueError(f"a node's release lacks group {name!r}")


def _noise(m: Measurement, rng: np.random.Generator, *, columns: int | None = None) -> Floats:
    """Simulate the noise of one measurement: (SIMULATIONS, columns) in released units.

    ``columns`` defaults to one per value. Every value of a measurement has the same noise
    law, so marginal intervals can share one simulated column (``columns=1``, broadcast);
    joint functions of several values (quantiles) need independent columns.
    """
    width = len(m.values) if columns is None else columns
    size = SIMULATIONS * width
    g = m.noise.granularity or 1.0
    scale = m.noise.scale / g
    if scale == 0:
        return np.zeros((SIMULATIONS, width))
    if m.noise.mechanism is Mechanism.LAPLACE:
        draws = sample_discrete_laplace(scale=scale, size=size, rng=rng)
    else:
        draws = sample_discrete_gaussian(sigma=scale, size=size, rng=rng)
    return draws.reshape(SIMULATIONS, width).astype(np.float64) * g


def _additive(
    parts: Sequence[Measurement], alpha: float, rng: np.random.Generator
) -> tuple[Estimate, ...]:
    total = np.sum([np.asarray(m.values, dtype=np.float64) for m in parts], axis=0)
    # One shared column per node: each value's interval only needs its marginal law.
    noise = np.sum([_noise(m, rng, columns=1) for m in parts], axis=0)
    lo_q, hi_q = np.quantile(noise, [alpha, 1 - alpha], axis=0)
    lo_q = np.broadcast_to(lo_q, total.shape)
    hi_q = np.broadcast_to(hi_q, total.shape)
    suppressed = _suppressed_anywhere(parts)
    return tuple(
        SUPPRESSED if gone else Estimate(value=float(v), low=float(v - hi), high=float(v - lo))
        for v, lo, hi, gone in zip(total, lo_q, hi_q, suppressed, strict=True)
    )


def _ratio(sums: Floats, counts: Floats) -> Floats:
    return np.asarray(sums / np.maximum(counts, 1.0), dtype=np.float64)


def _mean(parts: Sequence[GroupRelease], alpha: float, rng: np.random.Generator) -> Estimate:
    sums = [p.measurement("sum") for p in parts]
    counts = [p.measurement("count") for p in parts]
    if _suppressed_anywhere(sums + counts).any():
        return SUPPRESSED
    s_obs = np.array([m.values[0] for m in sums])
    c_obs = np.array([m.values[0] for m in counts])
    centers = np.array([m.center for m in sums])
    value = float(_ratio(np.array(np.sum(s_obs + centers * c_obs)), np.array(c_obs.sum())))
    s_sim = s_obs[:, None] - np.stack([_noise(m, rng)[:, 0] for m in sums])
    c_sim = c_obs[:, None] - np.stack([_noise(m, rng)[:, 0] for m in counts])
    sims = _ratio(np.sum(s_sim + centers[:, None] * c_sim, axis=0), np.sum(c_sim, axis=0))
    low, high = np.quantile(sims, [alpha, 1 - alpha])
    return Estimate(value=value, low=float(low), high=float(high))


def _monotone_cdf(hist: Floats) -> Floats:
    """The cumulative counts at the bin edges (..., bins + 1) of noisy histogram(s), made
    non-decreasing and non-negative.

    The prefix sums of the raw noisy bins are unbiased for the true cumulative counts;
    setting each negative bin to 0 first would not be: every empty bin would keep its
    positive noise, and over a few hundred mostly empty bins that false mass moves every
    quantile (a review measured 0-89% coverage of the 95% interval). The mean of the
    running maximum from the left and the running minimum from the right is monotone and
    keeps most of that unbiasedness.
    """
    zero = np.zeros((*hist.shape[:-1], 1))
    cdf = np.concatenate([zero, np.cumsum(hist, axis=-1)], axis=-1)
    up = np.maximum.accumulate(cdf, axis=-1)
    down = np.flip(np.minimum.accumulate(np.flip(cdf, axis=-1), axis=-1), axis=-1)
    return np.asarray(np.maximum((up + down) / 2.0, 0.0), dtype=np.float64)


def _clamped(estimate: Estimate, bounds: tuple[float, float] | None) -> Estimate:
    """``estimate`` clamped to ``bounds``: a mean of few noisy records can land far outside
    them (a review saw -4.5e6 for incomes in [0, 5e5]); the truth cannot."""
    if bounds is None or estimate.suppressed:
        return estimate
    low, high = bounds
    return Estimate(
        value=min(max(estimate.value, low), high),
        low=min(max(estimate.low, low), high),
        high=min(max(estimate.high, low), high),
    )


def _quantile_of(hist: Floats, edges: Floats, qs: Sequence[float]) -> Floats:
    """Quantiles of histogram(s) ``hist`` (..., bins) with linear interpolation in a bin.

    The q-quantile is where the cumulative count (``_monotone_cdf``) reaches q times the
    total: q = 0 is the left edge of the first bin with mass, q = 1 the right edge of the
    last. With no mass at all, the middle of the bounds.
    """
    mono = _monotone_cdf(hist)
    mass = np.diff(mono, axis=-1)
    total = mono[..., -1]
    bins = hist.shape[-1]
    widths = np.diff(edges)
    # The bin after the last one with mass (its left edge is the data's upper end).
    after_last = bins - np.argmax(mass[..., ::-1] > 0, axis=-1)
    top = np.where(total > 0, edges[after_last], (edges[0] + edges[-1]) / 2.0)
    out = np.empty((*hist.shape[:-1], len(qs)))
    for j, q in enumerate(qs):
        target = q * total
        # The first bin whose right-edge count passes the target: its left-edge count is
        # at most the target, so the bin has mass and the fraction is in [0, 1).
        passes = mono[..., 1:] > target[..., None]
        idx = np.argmax(passes, axis=-1)
        below = np.take_along_axis(mono, idx[..., None], axis=-1)[..., 0]
        inside = np.take_along_axis(mass, idx[..., None], axis=-1)[..., 0]
        frac = np.clip((target - below) / np.where(inside > 0, inside, 1.0), 0.0, 1.0)
        out[..., j] = np.where(passes.any(axis=-1), edges[idx] + frac * widths[idx], top)
    return out


def _quantile_band(
    hist: Floats, noise: Floats, edges: Floats, qs: Sequence[float], confidence: float
) -> tuple[Floats, Floats]:
    """Intervals for the quantiles of the records, from a simultaneous band on the CDF.

    The q-quantile of the records (the smallest value with at least q n of the n records at
    or below it; for q = 0, the smallest record) lies in the bin ending at the first edge k
    where ``D_k = C_k - q C_n >= 0`` (``C_k``: true records below edge k; for q = 0,
    ``D_k = C_k - 1``). The noisy ``D^_k`` has the noise ``W_k - q W_n``, a linear function
    of the bins' independent noises (``noise``: simulated draws of them, one row per draw).
    With ``m`` its maximum magnitude over all edges at probability ``confidence``, every
    ``D_k`` is within ``m`` of ``D^_k`` at once, so the bin lies between the first edge
    where ``D^_k + m >= 0`` and the first where ``D^_k - m >= 0``. Valid whatever the
    noise, the data size or the bias of the point estimate (a percentile bootstrap of the
    estimate was not: a review measured 15-53% coverage of its 95% interval at 200
    records per node and epsilon 0.1), and conservative: inside a bin the histogram says
    nothing of where the records lie, so the interval ends on bin edges.
    """
    observed = np.concatenate([[0.0], np.cumsum(hist)])
    walks = np.concatenate([np.zeros((noise.shape[0], 1)), np.cumsum(noise, axis=1)], axis=1)
    last = len(edges) - 1
    low = np.empty(len(qs))
    high = np.empty(len(qs))
    for j, q in enumerate(qs):
        term = walks - q * walks[:, -1:]
        margin = float(np.quantile(np.abs(term).max(axis=1), confidence))
        gap = observed - q * observed[-1] - (1.0 if q == 0 else 0.0)
        maybe = gap + margin >= 0  # edges at or past the quantile's bin, as far as we know
        surely = gap - margin >= 0
        first_maybe = int(np.argmax(maybe)) if maybe.any() else last
        first_surely = int(np.argmax(surely)) if surely.any() else last
        low[j] = edges[max(first_maybe - 1, 0)]
        high[j] = edges[min(max(first_surely, 1), last)]
    return low, high


def _quantiles(
    parts: Sequence[GroupRelease],
    edges: Floats,
    qs: Sequence[float],
    alpha: float,
    rng: np.random.Generator,
) -> tuple[Estimate, ...]:
    bins = [p.measurement("bins") for p in parts]
    if _suppressed_anywhere(bins).any():
        return tuple(SUPPRESSED for _ in qs)
    hist = np.sum([np.asarray(m.values, dtype=np.float64) for m in bins], axis=0)
    value = _quantile_of(hist, edges, qs)
    noise = np.sum([_noise(m, rng) for m in bins], axis=0)
    low, high = _quantile_band(hist, noise, edges, qs, 1.0 - 2.0 * alpha)
    return tuple(
        Estimate(value=float(v), low=float(min(lo, v)), high=float(max(hi, v)))
        for v, lo, hi in zip(value, low, high, strict=True)
    )
