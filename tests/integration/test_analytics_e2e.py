"""End to end over real node processes: each query kind, combining, group-by and filters."""

from __future__ import annotations

import numpy as np
import pytest

from federation import Count, Histogram, Mean, Quantile, Sum, parse_filter
from federation.coordinator import Coordinator
from federation.datasets import CREDIT_SCHEMA

EPS = 2.0


def pooled(frames: dict[str, dict[str, np.ndarray]], column: str) -> np.ndarray:
    return np.concatenate([f[column] for f in frames.values()])


def test_describe_shows_schema_budget_and_identity(fed: Coordinator) -> None:
    descriptions = fed.describe()
    assert set(descriptions) == {"hong-kong", "shenzhen"}
    for name, desc in descriptions.items():
        assert desc.node_name == name
        assert desc.consumer == "local-researcher"  # from the TLS client certificate
        assert desc.dataset("credit") == CREDIT_SCHEMA
        assert desc.budget.epsilon == 1000.0
        assert "analyze" in desc.allowed_operations


def test_count_combines_both_nodes(fed: Coordinator, frames) -> None:
    result = fed.analyze(Count("credit"), epsilon=EPS, seed=1)
    truth = sum(len(f["age"]) for f in frames.values())
    est = result.estimate()
    assert est.low <= est.value <= est.high
    assert abs(est.value - truth) < 30  # two discrete Laplace(0.5) noises
    assert [n.node for n in result.nodes] == ["hong-kong", "shenzhen"]
    assert all(n.epsilon == pytest.approx(EPS) for n in result.nodes)
    assert all(len(n.receipt_id) == 32 for n in result.nodes)


def test_sum_and_mean_are_close_to_truth(fed: Coordinator, frames) -> None:
    income = pooled(frames, "income")
    total = fed.analyze(Sum("credit", "income"), epsilon=EPS).estimate()
    assert total.value == pytest.approx(income.sum(), rel=1e-3)
    mean = fed.analyze(Mean("credit", "income"), epsilon=EPS).estimate()
    assert mean.value == pytest.approx(income.mean(), rel=1e-2)
    assert mean.low < income.mean() < mean.high or abs(mean.value - income.mean()) < 500


def test_filtered_mean_matches_filtered_truth(fed: Coordinator, frames) -> None:
    where = parse_filter("age >= 40 and housing in ('rent', 'public')")
    result = fed.analyze(Mean("credit", "debt_ratio", where=where), epsilon=EPS)
    age, housing = pooled(frames, "age"), pooled(frames, "housing")
    mask = (age >= 40) & np.isin(housing, ["rent", "public"])
    truth = pooled(frames, "debt_ratio")[mask].mean()
    assert result.value == pytest.approx(truth, abs=0.05)


def test_group_by_uses_the_public_domain(fed: Coordinator, frames) -> None:
    result = fed.analyze(Count("credit", group_by="employment"), epsilon=EPS)
    domain = CREDIT_SCHEMA.column("employment").domain
    assert [g.group for g in result.groups] == list(domain)
    employment = pooled(frames, "employment")
    for g in result.groups:
        assert g.estimates[0].value == pytest.approx((employment == g.group).sum(), abs=40)


def test_histogram_numeric_bins(fed: Coordinator, frames) -> None:
    result = fed.analyze(Histogram("credit", "age", bins=6), epsilon=EPS)
    truth, _ = np.histogram(pooled(frames, "age"), bins=np.linspace(18, 90, 7))
    got = [e.value for e in result.groups[0].estimates]
    assert len(result.labels) == 6
    assert np.allclose(got, truth, atol=40)


def test_histogram_of_a_category_uses_domain_labels(fed: Coordinator) -> None:
    result = fed.analyze(Histogram("credit", "housing"), epsilon=EPS)
    assert result.labels == CREDIT_SCHEMA.column("housing").domain


def test_quantiles_are_within_a_bin_or_two(fed: Coordinator, frames) -> None:
    qs = (0.1, 0.5, 0.9)
    result = fed.analyze(Quantile("credit", "age", quantiles=qs, bins=72), epsilon=EPS)
    truth = np.quantile(pooled(frames, "age"), qs)
    got = [e.value for e in result.groups[0].estimates]
    assert np.allclose(got, truth, atol=2.5)
    for e in result.groups[0].estimates:
        assert e.low <= e.value <= e.high


def test_gaussian_mechanism_end_to_end(fed: Coordinator, frames) -> None:
    result = fed.analyze(Count("credit"), epsilon=EPS, delta=1e-8, mechanism="gaussian")
    truth = sum(len(f["age"]) for f in frames.values())
    assert abs(result.value - truth) < 60
    assert all(n.delta == pytest.approx(1e-8) for n in result.nodes)


def test_request_bounds_override_public_bounds(fed: Coordinator, frames) -> None:
    result = fed.analyze(Mean("credit", "income", bounds=(0.0, 100_000.0)), epsilon=EPS)
    truth = np.clip(pooled(frames, "income"), 0, 100_000).mean()
    assert result.value == pytest.approx(truth, rel=2e-2)


def test_a_mean_of_almost_nobody_stays_within_the_public_bounds(fed: Coordinator) -> None:
    # No record matches: the noisy sum over a noisy count near 0 lands far outside [18, 90]
    # unclamped; the coordinator clamps the mean and its interval to the column's bounds.
    where = parse_filter("age > 89.5 and age < 89.6")
    result = fed.analyze(Mean("credit", "age", where=where), epsilon=0.05, seed=3)
    estimate = result.estimate()
    assert 18.0 <= estimate.low <= estimate.value <= estimate.high <= 90.0
