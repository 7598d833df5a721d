"""Minimum-cohort guard: withhold statistics about groups whose *DP* count is small.

A consumer policy's ``min_cohort = k`` (0: off) makes the node suppress every group whose
released noisy count is below ``k``: its values come back as NaN, which the coordinator
reports as suppressed and never combines with other nodes' numbers.

What it decides on, per query kind:

- ``count``: the group's noisy count.
- ``mean``: the noisy count the mean already releases (half of its epsilon).
- ``histogram``: each bin separately (a bin is a cell: the records of one group and bin).
- ``quantile``: the group's noisy total, the sum of its noisy bins.
- ``sum``: a sum releases no count, so under ``min_cohort > 0`` the node adds one: the
  request's epsilon (and delta) is split, :data:`COUNT_SHARE_FOR_SUM` to a noisy count and
  the rest to the sum, and the count is released beside the sum. The total cost is the
  epsilon asked for; the sum's noise grows by ``1 / (1 - COUNT_SHARE_FOR_SUM)``.

Privacy meaning, honestly. The decision reads only values that are already differentially
private, so it is post-processing: it costs no extra epsilon and leaks nothing beyond the
release it filters. A guard that compared the *true* filtered count with ``k`` would be a
non-private function of the data (whether a cohort has 9 or 10 members would show in the
refusal), which is why this one never looks at a true count. It follows that the guard adds
**no formal protection** beyond epsilon: a cohort of 3 may still slip through when noise
pushes its count above ``k``, and a cohort of 30 may be withheld. What it does is make
statistics about tiny cohorts rare, where they would be mostly noise anyway, which helps
interpretation and matches the small-cell rules statistical offices and regulators apply to
published tables. The differential-privacy guarantee (epsilon, delta) remains the protection.
"""

from __future__ import annotations

import math
from dataclasses import replace

from federation.queries import Histogram, Quantile, Query
from federation.releases import GroupRelease, Measurement

__all__ = ["COUNT_SHARE_FOR_SUM", "suppress_small_cohorts"]

COUNT_SHARE_FOR_SUM = 0.25
"""Share of a guarded sum's epsilon (and delta) spent on the noisy count the guard reads."""

SUPPRESSED = math.nan
"""What a suppressed value is released as (no DP release is ever NaN otherwise)."""


def suppress_small_cohorts(
    groups: tuple[GroupRelease, ...], *, query: Query, min_cohort: int
) -> tuple[GroupRelease, ...]:
    """Replace by NaN the values of each group (or histogram bin) with a noisy count < k.

    Pure post-processing of a DP release: no privacy cost, no data read.

    Args:
        groups: the noisy release of ``query``, one entry per group.
        query: the query released (its kind says which count to read).
        min_cohort: the consumer's ``min_cohort``; 0 returns ``groups`` unchanged.

    Returns:
        The groups, with suppressed values set to NaN.

    Raises:
        RuntimeError: a guarded release carries no count (a bug in planning).

    >>> from federation.queries import Count, Mechanism
    >>> from federation.releases import NoiseInfo
    >>> noise = NoiseInfo(Mechanism.LAPLACE, scale=1.0, sensitivity=1.0, granularity=1.0)
    >>> groups = (
    ...     GroupRelease("small", (Measurement("count", (4.0,), noise),)),
    ...     GroupRelease("large", (Measurement("count", (40.0,), noise),)),
    ... )
    >>> released = suppress_small_cohorts(groups, query=Count("d"), min_cohort=10)
    >>> [g.measurements[0].values for g in released]
    [(nan,), (40.0,)]
    """
    if min_cohort <= 0:
        return groups
    if isinstance(query, Histogram):
        return tuple(_suppress_bins(group, min_cohort) for group in groups)
    return tuple(_suppress_group(group, query, min_cohort) for group in groups)


def _suppress_bins(group: GroupRelease, min_cohort: int) -> GroupRelease:
    """Suppress each histogram bin whose noisy count is below ``min_cohort``."""
    measurements = tuple(
        replace(m, values=tuple(_guard(v, min_cohort) for v in m.values)) if m.name == "bins" else m
        for m in group.measurements
    )
    return replace(group, measurements=measurements)


def _suppress_group(group: GroupRelease, query: Query, min_cohort: int) -> GroupRelease:
    """Suppress every value of ``group`` if its noisy count is below ``min_cohort``."""
    if _noisy_cohort(group, query) >= min_cohort:
        return group
    return replace(group, measurements=tuple(_blank(m) for m in group.measurements))


def _noisy_cohort(group: GroupRelease, query: Query) -> float:
    """The noisy size of ``group``: its count, or (quantile) the sum of its noisy bins."""
    by_name = {m.name: m for m in group.measurements}
    if isinstance(query, Quantile) and "bins" in by_name:
        return math.fsum(by_name["bins"].values)
    if "count" in by_name:
        return by_name["count"].values[0]
    raise RuntimeError(
        f"a {type(query).__name__.lower()} release guarded by min_cohort has no noisy count"
    )


def _guard(value: float, min_cohort: int) -> float:
    return SUPPRESSED if value < min_cohort else value


def _blank(measurement: Measurement) -> Measurement:
    return replace(measurement, values=tuple(SUPPRESSED for _ in measurement.values))
