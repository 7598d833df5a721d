"""Jupyter rendering: query results, budgets and node descriptions as escaped HTML tables."""

from __future__ import annotations

import doctest
import html.parser

import torch

import federation._html
from federation import Budgets, BudgetStatus, NodeDescription, QueryResult
from federation.coordinator import Estimate, GroupResult, NodeSpend
from federation.coordinator.training import NodeRound, RoundRecord, TrainingResult
from federation.filters import parse_filter
from federation.models import ModelSpec
from federation.queries import Histogram, Mean
from federation.schema import Column, ColumnType, DatasetSchema

EVIL = "<script>alert('x')</script>"


class _Collector(html.parser.HTMLParser):
    """Collects tags and text, to check what a browser would see."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(markup: str) -> _Collector:
    collector = _Collector()
    collector.feed(markup)
    collector.close()
    return collector


def _budget(spent: float = 1.5) -> BudgetStatus:
    return BudgetStatus(
        epsilon=10.0,
        delta=1e-6,
        spent_epsilon=spent,
        remaining_epsilon=10.0 - spent,
        releases=3,
        max_epsilon_per_release=2.0,
    )


def _spend(node: str) -> NodeSpend:
    return NodeSpend(
        node=node,
        epsilon=0.5,
        delta=0.0,
        spent_epsilon=1.5,
        remaining_epsilon=8.5,
        receipt_id="0123456789abcdef0123456789abcdef",
    )


def _histogram_result(group: str = "rent") -> QueryResult:
    return QueryResult(
        query=Histogram("credit", "defaulted", group_by="housing"),
        labels=("false", "true"),
        groups=(
            GroupResult(group, (Estimate(9_120.0, 9_100.0, 9_140.0), Estimate(611.0, 590, 632))),
        ),
        nodes=(_spend("hong-kong"), _spend("shenzhen")),
    )


def test_doctests_of_the_html_module_pass() -> None:
    assert doctest.testmod(federation._html).failed == 0


def test_query_result_renders_estimates_intervals_and_costs() -> None:
    result = QueryResult(
        query=Mean("credit", "income", where=parse_filter("age >= 40")),
        labels=("mean",),
        groups=(GroupResult("", (Estimate(183_456.7, 182_900.0, 184_010.0),)),),
        nodes=(_spend("hong-kong"), _spend("shenzhen")),
    )
    markup = result._repr_html_()
    text = " ".join(_parse(markup).text)
    assert "table" in _parse(markup).tags
    assert "mean of income in credit, where age >= 40.0" in text
    assert "183,457" in text
    assert "[182,900, 184,010]" in text
    assert "95% CI" in text
    assert "hong-kong" in text
    assert "shenzhen" in text
    assert "0123456789ab" in text  # receipt id, shortened
    assert "true value" not in text


def test_query_result_shows_true_values_beside_estimates_when_given() -> None:
    text = " ".join(_parse(_histogram_result().to_html(truth={"rent": [9_118, 613]})).text)
    assert "true value" in text
    assert "9,118" in text
    assert "613" in text


def test_every_string_is_escaped() -> None:
    result = _histogram_result(group=EVIL)
    description = NodeDescription(
        node_name=EVIL,
        jurisdiction=EVIL,
        software_version="0.1.0",
        datasets=(
            DatasetSchema(
                name="credit",
                description=EVIL,
                columns=(
                    Column("housing", ColumnType.CATEGORY, domain=(EVIL, "own")),
                    Column("age", ColumnType.INT, 18, 90, description=EVIL),
                ),
            ),
        ),
        consumer=EVIL,
        budget=_budget(),
        allowed_operations=("describe", EVIL),
    )
    budgets = Budgets({EVIL: _budget()})
    for markup in (result._repr_html_(), description._repr_html_(), budgets._repr_html_()):
        parsed = _parse(markup)
        assert "script" not in parsed.tags
        assert any(EVIL in t for t in parsed.text)  # shown as text, not run


def test_budgets_behave_as_a_dict_and_render_a_bar_per_node() -> None:
    budgets = Budgets({"hong-kong": _budget(1.5), "shenzhen": _budget(9.5)})
    assert isinstance(budgets, dict)
    assert budgets == {"hong-kong": _budget(1.5), "shenzhen": _budget(9.5)}
    assert budgets["shenzhen"].remaining_epsilon == 0.5
    markup = budgets._repr_html_()
    assert "width:15.0%" in markup
    assert "width:95.0%" in markup
    text = " ".join(_parse(markup).text)
    assert "hong-kong" in text
    assert "shenzhen" in text


def test_node_description_lists_columns_with_bounds_and_domains() -> None:
    description = NodeDescription(
        node_name="hong-kong",
        jurisdiction="HK",
        software_version="0.1.0",
        datasets=(
            DatasetSchema(
                name="credit",
                columns=(
                    Column("income", ColumnType.FLOAT, 0, 500_000, description="annual"),
                    Column("housing", ColumnType.CATEGORY, domain=("own", "rent")),
                    Column("defaulted", ColumnType.BOOL),
                ),
            ),
        ),
        consumer="local-researcher",
        budget=_budget(),
        allowed_operations=("describe", "analyze"),
    )
    text = " ".join(_parse(description._repr_html_()).text)
    assert "hong-kong" in text
    assert "[0, 500,000]" in text
    assert "{own, rent}" in text
    assert "{false, true}" in text
    assert "describe, analyze" in text


def _node_round(node: str, round_: int) -> NodeRound:
    return NodeRound(
        node=node,
        epsilon=0.9,
        delta=1e-7,
        job_epsilon=1.2 + round_,
        spent_epsilon=2.0 + round_,
        remaining_epsilon=8.0 - round_,
        noisy_examples=18_081.0,
        noise_multiplier=0.946,
        steps=20,
        metrics=(("accuracy", 0.93), ("loss", 0.31)),
        receipt={"receipt": {"id": f"{node}-receipt-{round_}"}},
    )


def test_training_result_renders_one_row_per_node_and_round() -> None:
    history = [
        RoundRecord(
            round=r,
            nodes=(_node_round("hong-kong", r), _node_round(EVIL, r)),
            missing=("shenzhen",) if r == 1 else (),
            partial=(),
            failures=(("shenzhen", EVIL),) if r == 1 else (),
            duration_s=0.7,
        )
        for r in range(2)
    ]
    result = TrainingResult(
        model=torch.nn.Linear(3, 1),
        history=history,
        spec=ModelSpec("mlp", "credit", ("age", "income"), "defaulted", hidden=(32,)),
        input_dim=2,
        job_id="8be565ef63b94d268924d347c23ea874",
    )
    parsed = _parse(result._repr_html_())
    assert "script" not in parsed.tags
    text = " ".join(parsed.text)
    assert "mlp [32]" in text
    assert "2 rounds" in text
    assert "accuracy" in text
    assert "0.93" in text
    assert "hong-kong-re" in text  # receipt id, shortened
    assert "dropped:" in text
    assert parsed.tags.count("tr") == 1 + 2 * 2 + 1  # header, 2 nodes x 2 rounds, 1 dropped
