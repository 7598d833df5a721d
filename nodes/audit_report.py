"""The compliance report: what a node released, to whom, at what privacy cost.

Built from the audit chain alone (``nodes.audit``), after verifying it, so that the
document an operator hands a regulator says whether the trail it summarises is intact.
Rendered as Markdown, JSON or HTML with the standard library; ``--plot`` draws cumulative ε
per consumer over time with matplotlib (imported only then).
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np

from federation.errors import ConfigError
from nodes.audit import Entry, iter_entries
from nodes.audit_verify import Verification

__all__ = ["Format", "Report", "build_report", "parse_since", "plot_spend", "render"]

Format = Literal["md", "json", "html"]
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([dhm])")
_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}


def parse_since(text: str, *, now: datetime | None = None) -> float:
    """Parse ``--since``: an ISO date or date-time (UTC unless it says), or ``7d``/``12h``/``30m``.

    Raises:
        ConfigError: the text is neither.
    """
    now = now or datetime.now(UTC)
    match = _RELATIVE.fullmatch(text.strip())
    if match:
        return (now - float(match.group(1)) * _UNITS[match.group(2)]).timestamp()
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--since: expected an ISO date (2026-01-31), date-time (2026-01-31T08:00+08:00) "
            f"or an age like 7d, 12h, 30m; got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass
class ConsumerSummary:
    """One consumer's budget and activity."""

    consumer: str
    # From the consumer's latest charge entry (all time); None if it was never charged.
    budget_epsilon: float | None = None
    budget_delta: float | None = None
    spent_epsilon: float | None = None  # composed
    remaining_epsilon: float | None = None
    charges: int = 0  # in the period
    releases: int = 0
    never_released: int = 0
    epsilon_charged: float = 0.0  # plain sum of per-release epsilons, in the period
    refused: int = 0


@dataclass
class Report:
    """Everything the rendered report says (``render`` formats it)."""

    node: str
    jurisdiction: str
    generated_at: float
    since: float | None
    verification: Verification
    consumers: dict[str, ConsumerSummary] = field(default_factory=dict)
    daily: list[dict[str, object]] = field(default_factory=list)
    operations: list[dict[str, object]] = field(default_factory=list)
    refusals: list[dict[str, object]] = field(default_factory=list)
    events: list[dict[str, object]] = field(default_factory=list)
    spend_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)


def build_report(
    conn: sqlite3.Connection,
    verification: Verification,
    *,
    since: float | None = None,
    now: float | None = None,
) -> Report:
    """Summarise the chain in ``conn`` (entries at or after ``since`` for the period tables)."""
    generated = now if now is not None else datetime.now(UTC).timestamp()
    report = Report("", "", generated, since, verification)
    entries = list(iter_entries(conn))
    released = {str(e.fields.get("ref")) for e in entries if e.kind == "release"}
    daily: dict[tuple[str, str], dict[str, object]] = {}
    operations: dict[tuple[str, str], list[float]] = defaultdict(list)
    refusals: Counter[tuple[str, str, str]] = Counter()
    examples: dict[tuple[str, str, str], str] = {}
    for entry in entries:
        in_period = since is None or entry.time >= since
        if entry.kind == "key":
            _on_key(report, entry)
        elif entry.kind == "charge":
            _on_charge(report, entry, in_period=in_period, released=entry.id in released)
            if in_period:
                _add_daily(daily, entry)
                query = _operation_detail(entry)
                operations[(entry.operation, query)].append(_number(entry.fields, "epsilon"))
        elif entry.kind in ("refused", "refused_summary") and in_period:
            count = 1 + _int(entry.fields, "suppressed_before") if entry.kind == "refused" else 0
            count += _int(entry.fields, "suppressed")
            key = (
                entry.consumer or "(unauthenticated)",
                entry.operation or "-",
                str(entry.fields.get("code", "(rate-limited, counted)")),
            )
            refusals[key] += count
            examples.setdefault(key, str(entry.fields.get("reason", "")))
            _summary(report, key[0]).refused += count
        elif entry.kind == "override":
            report.events.append(_event(entry, "started on a broken chain (--allow-broken-audit)"))
    report.daily = sorted(daily.values(), key=lambda d: (str(d["day"]), str(d["consumer"])))
    report.operations = [
        {"operation": op, "query": q, "releases": len(eps), "epsilon_charged": sum(eps)}
        for (op, q), eps in sorted(operations.items())
    ]
    report.refusals = [
        {"consumer": c, "operation": o, "code": code, "count": n, "example": examples[(c, o, code)]}
        for (c, o, code), n in sorted(refusals.items())
    ]
    return report


def _summary(report: Report, consumer: str) -> ConsumerSummary:
    return report.consumers.setdefault(consumer, ConsumerSummary(consumer))


def _on_key(report: Report, entry: Entry) -> None:
    report.node = str(entry.fields.get("node", ""))
    report.jurisdiction = str(entry.fields.get("jurisdiction", ""))
    what = "certificate" if entry.fields.get("certificate") else "key"
    report.events.append(
        _event(
            entry,
            f"signing {what} {entry.fields.get('key_id')} ({entry.fields.get('algorithm')}) in use",
        )
    )


def _on_charge(report: Report, entry: Entry, *, in_period: bool, released: bool) -> None:
    budget = entry.fields.get("budget")
    budget = budget if isinstance(budget, dict) else {}
    summary = _summary(report, entry.consumer)
    summary.budget_epsilon = _number(budget, "epsilon")
    summary.budget_delta = _number(budget, "delta")
    summary.spent_epsilon = _number(budget, "spent_epsilon")
    summary.remaining_epsilon = _number(budget, "remaining_epsilon")
    report.budgets[entry.consumer] = summary.budget_epsilon
    report.spend_series.setdefault(entry.consumer, []).append((entry.time, summary.spent_epsilon))

    if not in_period:
        return
    summary.charges += 1
    summary.epsilon_charged += _number(entry.fields, "epsilon")
    if released:
        summary.releases += 1
    else:
        summary.never_released += 1


def _add_daily(daily: dict[tuple[str, str], dict[str, object]], entry: Entry) -> None:
    day = datetime.fromtimestamp(entry.time, tz=UTC).strftime("%Y-%m-%d")
    row = daily.setdefault(
        (day, entry.consumer),
        {"day": day, "consumer": entry.consumer, "releases": 0, "epsilon_charged": 0.0},
    )
    row["releases"] = _int(row, "releases") + 1
    row["epsilon_charged"] = _number(row, "epsilon_charged") + _number(entry.fields, "epsilon")
    budget = entry.fields.get("budget")
    row["spent_epsilon_after"] = _number(
        budget if isinstance(budget, dict) else {}, "spent_epsilon"
    )


def _operation_detail(entry: Entry) -> str:
    params = entry.fields.get("parameters")
    params = params if isinstance(params, dict) else {}
    for key in ("query", "architecture", "model"):
        if isinstance(params.get(key), str):
            return str(params[key])
    return ""


def _event(entry: Entry, text: str) -> dict[str, object]:
    return {"entry": entry.sequence, "time": _iso(entry.time), "event": text}


def _number(data: Mapping[str, object], key: str) -> float:
    value = data.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _int(data: Mapping[str, object], key: str) -> int:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------ rendering


def _tables(report: Report) -> list[tuple[str, str, Sequence[str], list[Sequence[object]]]]:
    """(title, note, header, rows) of each section, shared by Markdown and HTML."""
    consumers = sorted(report.consumers.values(), key=lambda c: c.consumer)
    return [
        (
            "Privacy budget by consumer",
            "Composed ε as of each consumer's latest charge (all time). 'Charged, never "
            "released': budget spent on a release that was never sent (a crash or an error "
            "between charge and release); it is counted as spent.",
            [
                "consumer",
                "ε budget",
                "ε spent",
                "ε remaining",
                "δ budget",
                "releases",
                "charged, never released",
                "refused",
            ],
            [
                [
                    c.consumer or "(unauthenticated)",
                    _f(c.budget_epsilon),
                    _f(c.spent_epsilon),
                    _f(c.remaining_epsilon),
                    _f(c.budget_delta),
                    c.releases,
                    c.never_released,
                    c.refused,
                ]
                for c in consumers
            ],
        ),
        (
            "Spend per consumer over time (UTC days)",
            "ε charged: sum of the ε of that day's charges. ε spent after: the consumer's "
            "composed spend after its last charge that day (Rényi composition may make it "
            "smaller than a running sum).",
            ["day", "consumer", "releases", "ε charged", "ε spent after"],
            [
                [
                    d["day"],
                    d["consumer"],
                    d["releases"],
                    _f(d["epsilon_charged"]),
                    _f(d.get("spent_epsilon_after", 0.0)),
                ]
                for d in report.daily
            ],
        ),
        (
            "Releases by operation",
            "",
            ["operation", "query / model", "releases", "ε charged"],
            [
                [o["operation"], o["query"] or "-", o["releases"], _f(o["epsilon_charged"])]
                for o in report.operations
            ],
        ),
        (
            "Refused requests",
            "Refusals cost no budget. Beyond a per-consumer rate they are counted, not "
            "written one by one.",
            ["consumer", "operation", "code", "count", "example reason"],
            [
                [r["consumer"], r["operation"], r["code"], r["count"], r["example"]]
                for r in report.refusals
            ],
        ),
        (
            "Operator events",
            "",
            ["entry", "time", "event"],
            [[e["entry"], e["time"], e["event"]] for e in report.events],
        ),
    ]


def _f(value: object) -> str:
    if value is None:
        return "-"
    return f"{float(value):.4g}" if isinstance(value, int | float) else str(value)


def _integrity(report: Report) -> str:
    v = report.verification
    anchor = (
        "signatures anchored to the federation CA"
        if v.anchored
        else "signing keys trusted on first use (pass --ca to anchor them)"
    )
    if v.is_intact:
        return f"VERIFIED: {v.entries} entries, every hash and signature checks; {anchor}"
    return f"BROKEN: first broken {v.problems[0]} ({len(v.problems)} problem(s) in all)"


def _header(report: Report) -> list[tuple[str, str]]:
    v = report.verification
    period = f"since {_iso(report.since)}" if report.since is not None else "all time"
    return [
        ("Node", f"{report.node} ({report.jurisdiction})" if report.jurisdiction else report.node),
        ("Generated", _iso(report.generated_at)),
        ("Period", f"{period} to {_iso(report.generated_at)}"),
        ("Chain head", f"entry {v.head_sequence}, SHA-256 {v.head_hash}"),
        ("Integrity", _integrity(report)),
    ]


def render(report: Report, fmt: Format) -> str:
    """Render the report as Markdown, JSON or a standalone HTML page."""
    if fmt == "json":
        return json.dumps(_as_json(report), indent=2, sort_keys=True) + "\n"
    if fmt == "html":
        return _html(report)
    lines = [f"# Audit report: node {report.node}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _header(report)]
    if not report.verification.is_intact:
        lines += ["", "**The audit chain failed verification:**", ""]
        lines += [f"- {p}" for p in report.verification.problems]
    for title, note, header, rows in _tables(report):
        lines += ["", f"## {title}", ""]
        if note:
            lines += [note, ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
        if not rows:
            lines.append("| " + " | ".join("-" for _ in header) + " |")
    return "\n".join(lines) + "\n"


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _html(report: Report) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Audit report: node {esc(report.node)}</title><style>",
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #999;padding:.2em .6em;text-align:left}"
        ".broken{color:#b00;font-weight:bold}",
        "</style></head><body>",
        f"<h1>Audit report: node {esc(report.node)}</h1><ul>",
    ]
    broken = not report.verification.is_intact
    for key, value in _header(report):
        cls = " class='broken'" if key == "Integrity" and broken else ""
        parts.append(f"<li><b>{esc(key)}</b>: <span{cls}>{esc(value)}</span></li>")
    parts.append("</ul>")
    if broken:
        parts.append("<ul class='broken'>")
        parts += [f"<li>{esc(str(p))}</li>" for p in report.verification.problems]
        parts.append("</ul>")
    for title, note, header, rows in _tables(report):
        parts.append(f"<h2>{esc(title)}</h2>")
        if note:
            parts.append(f"<p>{esc(note)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _as_json(report: Report) -> dict[str, object]:
    v = report.verification
    return {
        "node": report.node,
        "jurisdiction": report.jurisdiction,
        "generated_at": report.generated_at,
        "since": report.since,
        "integrity": {
            "intact": v.is_intact,
            "anchored": v.anchored,
            "entries": v.entries,
            "head_sequence": v.head_sequence,
            "head_hash": v.head_hash,
            "problems": [{"entry": p.sequence, "problem": p.message} for p in v.problems],
        },
        "consumers": [vars(c) for c in sorted(report.consumers.values(), key=lambda c: c.consumer)],
        "spend_by_day": report.daily,
        "releases_by_operation": report.operations,
        "refused": report.refusals,
        "events": report.events,
    }


# ------------------------------------------------------------------ chart


def plot_spend(report: Report, path: Path) -> None:
    """Draw cumulative composed ε per consumer over time to a PNG (needs matplotlib)."""
    import matplotlib  # noqa: PLC0415 - only --plot needs it (seconds to import)

    matplotlib.use("Agg")
    from matplotlib import dates as mdates  # noqa: PLC0415
    from matplotlib import pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for number, (consumer, series) in enumerate(sorted(report.spend_series.items())):
        # datetime64 in UTC (matplotlib's default time zone), from the first charge on.
        # The line starts at 0 before the first charge and runs on to the report's time.
        ms = [round(t * 1000) for t, _ in series]
        end = max(ms[-1], round(report.generated_at * 1000))
        times = np.array([ms[0], *ms, end], dtype="datetime64[ms]")
        spent = np.array([0.0, *(s for _, s in series), series[-1][1]])
        color = f"C{number % 10}"
        ax.step(times, spent, where="post", color=color, label=consumer)
        budget = report.budgets.get(consumer)
        if budget:
            ax.axhline(budget, color=color, linestyle="--", linewidth=0.8)
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("cumulative ε spent (composed)")
    ax.set_title(f"Privacy spend per consumer at node {report.node} (dashed: budget)")
    if report.spend_series:
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
