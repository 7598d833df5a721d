"""HTML tables for Jupyter's ``_repr_html_``: query results, budgets, node descriptions.

Every string that reaches the page passes through ``html.escape`` (names, column
descriptions and category values come from node configs, i.e. from another party). The
markup is plain tables with inline styles, so it renders the same in JupyterLab, classic
Notebook, VS Code and exported HTML, and carries no script.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from federation.coordinator.analytics import QueryResult
    from federation.coordinator.training import TrainingResult
    from federation.queries import Query
    from federation.releases import BudgetStatus, NodeDescription
    from federation.schema import Column

__all__ = [
    "budgets_html",
    "describe_query",
    "node_description_html",
    "number",
    "query_result_html",
    "table",
    "training_result_html",
]

_TABLE = 'style="border-collapse:collapse;margin:0.3em 0"'
_CELL = "padding:2px 10px;border-bottom:1px solid #ddd"
_NUM = _CELL + ";text-align:right;font-variant-numeric:tabular-nums"
_MUTED = 'style="color:#666;font-size:0.9em"'


def number(value: float) -> str:
    """Format a number for a table: grouped digits from 1,000 on, 4 significant below.

    >>> number(40123.0), number(0.40263), number(183456.7), number(2.5e9), number(0.0)
    ('40,123', '0.4026', '183,457', '2.5e+09', '0')
    """
    if not math.isfinite(value):
        return str(value)
    if 1_000 <= abs(value) < 1e9:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str | float | int]],
    *,
    numeric: Sequence[bool] | None = None,
) -> str:
    """Render a table; str cells are escaped here, numbers formatted with ``number``."""
    numeric = numeric or [False] * len(headers)
    head = "".join(
        f'<th style="{_NUM if num else _CELL}">{escape(h)}</th>'
        for h, num in zip(headers, numeric, strict=True)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td style="{_NUM if num else _CELL}">{_cell(value)}</td>'
            for value, num in zip(row, numeric, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table {_TABLE}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell(value: str | float | int) -> str:
    if isinstance(value, str):
        return escape(value)
    return escape(number(float(value)))


def describe_query(query: Query) -> str:
    """One line in words: ``mean of income in credit, where age >= 40, by housing``."""
    from federation.filters import format_filter

    kind = type(query).__name__.lower()
    column = getattr(query, "column", None)
    text = f"{kind} of {column}" if column else kind
    text += f" in {query.dataset}"
    if query.where is not None:
        text += f", where {format_filter(query.where)}"
    if query.group_by:
        text += f", by {query.group_by}"
    return text


def query_result_html(
    result: QueryResult, *, truth: Mapping[str, Sequence[float]] | None = None
) -> str:
    """Render estimates, intervals (and true values, if given) and what each node charged."""
    pct = f"{result.confidence * 100:g}% CI"
    headers = ["group", "", "DP estimate", pct] + (["true value"] if truth is not None else [])
    rows: list[list[str | float]] = []
    for g in result.groups:
        for i, (label, e) in enumerate(zip(result.labels, g.estimates, strict=True)):
            row: list[str | float] = [
                (g.group or "all") if i == 0 else "",
                label,
                e.value,
                f"[{number(e.low)}, {number(e.high)}]",
            ]
            if truth is not None:
                row.append(truth[g.group][i])
            rows.append(row)
    numeric = [False, False, True, True] + ([True] if truth is not None else [])
    cost_rows: list[list[str | float]] = [
        [
            n.node,
            n.epsilon,
            n.delta,
            n.spent_epsilon,
            n.remaining_epsilon,
            n.receipt_id[:12],
        ]
        for n in result.nodes
    ]
    cost = table(
        ["node", "ε charged", "δ charged", "ε spent", "ε remaining", "receipt"],
        cost_rows,
        numeric=[False, True, True, True, True, False],
    )
    parts = [
        f"<div><strong>{escape(describe_query(result.query))}</strong></div>",
        table(headers, rows, numeric=numeric),
        f"<div {_MUTED}>cost per node (each node charges its own budget)</div>",
        cost,
    ]
    if result.missing:
        parts.append(f"<div {_MUTED}>answered without: {escape(', '.join(result.missing))}</div>")
    parts += [f"<div {_MUTED}>{escape(note)}</div>" for note in result.notes]
    return "<div>" + "".join(parts) + "</div>"


def _bar(fraction: float) -> str:
    """A small horizontal bar, ``fraction`` (0..1) filled."""
    pct = max(0.0, min(1.0, fraction)) * 100
    colour = "#c0392b" if pct >= 90 else "#4c78a8"
    return (
        '<div style="width:120px;height:9px;background:#e5e5e5;display:inline-block">'
        f'<div style="width:{pct:.1f}%;height:9px;background:{colour}"></div></div>'
    )


def budgets_html(budgets: Mapping[str, BudgetStatus]) -> str:
    """Render each node's budget: spent, total, remaining, releases, and a spend bar."""
    headers = ["node", "ε spent", "of ε", "ε remaining", "", "δ", "releases", "max ε/release"]
    head = "".join(f'<th style="{_CELL}">{escape(h)}</th>' for h in headers)
    body = []
    for name, b in budgets.items():
        fraction = b.spent_epsilon / b.epsilon if b.epsilon > 0 else 1.0
        cells = [
            f'<td style="{_CELL}">{escape(name)}</td>',
            *(
                f'<td style="{_NUM}">{escape(number(v))}</td>'
                for v in (b.spent_epsilon, b.epsilon, b.remaining_epsilon)
            ),
            f'<td style="{_CELL}">{_bar(fraction)}</td>',
            *(
                f'<td style="{_NUM}">{escape(number(v))}</td>'
                for v in (b.delta, b.releases, b.max_epsilon_per_release)
            ),
        ]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table {_TABLE}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _bounds(column: Column) -> str:
    if column.lower is not None and column.upper is not None:
        return f"[{number(column.lower)}, {number(column.upper)}]"
    if column.domain:
        return "{" + ", ".join(column.domain) + "}"
    return "(no public bounds)"


def node_description_html(d: NodeDescription) -> str:
    """Render a node's public metadata: identity, this consumer's budget, dataset schemas."""
    b = d.budget
    parts = [
        f"<div><strong>{escape(d.node_name)}</strong> ({escape(d.jurisdiction)}), "
        f"federation {escape(d.software_version)}</div>",
        f"<div {_MUTED}>you are {escape(d.consumer)}; allowed: "
        f"{escape(', '.join(d.allowed_operations))}</div>",
        f"<div {_MUTED}>budget: ε {escape(number(b.spent_epsilon))} spent of "
        f"{escape(number(b.epsilon))} ({escape(number(b.remaining_epsilon))} left; "
        f"δ {escape(number(b.delta))}; at most ε {escape(number(b.max_epsilon_per_release))}"
        + (
            f", δ {escape(number(b.max_delta_per_release))}"
            if b.max_delta_per_release is not None
            else ""
        )
        + f" per release; {b.releases} releases)</div>",
    ]
    for schema in d.datasets:
        caption = f"dataset {schema.name}" + (
            f": {schema.description}" if schema.description else ""
        )
        parts.append(f'<div style="margin-top:0.4em">{escape(caption)}</div>')
        parts.append(
            table(
                ["column", "type", "public bounds / domain", "description"],
                [[c.name, c.type.value, _bounds(c), c.description] for c in schema.columns],
            )
        )
    return "<div>" + "".join(parts) + "</div>"


def training_result_html(result: TrainingResult) -> str:
    """Render a training job: the model, then one row per node per round (cost, DP count)."""
    spec = result.spec
    arch = spec.architecture + (f" {list(spec.hidden)}" if spec.hidden else "")
    metric_names = sorted({m for r in result.history for n in r.nodes for m, _ in n.metrics})
    headers = ["round", "node", "ε charged", "job ε (composed)", "ε remaining", "DP examples"]
    headers += ["noise multiplier", *metric_names, "receipt"]
    rows: list[list[str | float]] = []
    for record in result.history:
        for n in record.nodes:
            values = dict(n.metrics)
            receipt = n.receipt.get("receipt")
            receipt_id = str(receipt.get("id", "")) if isinstance(receipt, Mapping) else ""
            rows.append(
                [
                    str(record.round),
                    n.node,
                    n.epsilon,
                    n.job_epsilon,
                    n.remaining_epsilon,
                    n.noisy_examples,
                    n.noise_multiplier,
                    *(values.get(m, math.nan) for m in metric_names),
                    receipt_id[:12],
                ]
            )
        charged = {n.node: n for n in record.charged}
        for node, reason in record.failures:
            paid = charged.get(node)
            if paid is None:
                blank: list[str | float] = ["—"] * (5 + len(metric_names))
                rows.append([str(record.round), node, *blank, f"dropped: {reason}"])
                continue
            # It charged the round (its result arrived), but its update was not used: the
            # cost counts, as in the CLI's table and the job's spend.
            rows.append(
                [
                    str(record.round),
                    node,
                    paid.epsilon,
                    paid.job_epsilon,
                    paid.remaining_epsilon,
                    paid.noisy_examples,
                    paid.noise_multiplier,
                    *(["—"] * len(metric_names)),
                    f"charged, update not used: {reason}",
                ]
            )
    numeric = [False, False, True, True, True, True, True] + [True] * len(metric_names) + [False]
    history = table(headers, rows, numeric=numeric)
    planned = result.planned_epsilon
    spent = {n: e for r in result.history for n, e in r.job_epsilon.items()}
    over = [
        f"{node}: job ε {value:.4g} is above the {planned:.4g} this job was planned to cost "
        "(a round that was retried, after a timeout, a lost node or a resume, is charged again)"
        for node, value in sorted(spent.items())
        if planned is not None and value > planned * (1 + 1e-3)
    ]
    if over:
        history += "".join(f"<div>{escape(line)}</div>" for line in over)
    summary = (
        f"<div><strong>{escape(arch)}</strong> on {escape(spec.dataset)}: predicts "
        f"{escape(spec.target)} from {len(spec.features)} features; "
        f"{len(result.history)} rounds; job {escape(result.job_id[:12])}</div>"
    )
    scroll = '<div style="max-height:28em;overflow:auto">'
    own = list(dict.fromkeys(name for r in result.history for name, _ in r.evaluation))
    evaluation = ""
    if own:
        own_rows: list[list[str | float]] = [
            [str(r.round), *(dict(r.evaluation).get(name, math.nan) for name in own)]
            for r in result.history
        ]
        evaluation = (
            "<div>The coordinator's own evaluation of the global model (its own data, "
            "no privacy cost)</div>"
            + table(["round", *own], own_rows, numeric=[False] + [True] * len(own))
        )
    return f"<div>{summary}{scroll}{history}</div>{evaluation}</div>"
