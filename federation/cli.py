"""The ``federation`` command.

Consumer commands: ``describe``, ``query``, ``receipts verify``; node operators and
auditors: ``node serve|init`` and ``audit verify|report`` (run by the node runtime in its own
process); certificates: ``certs init|issue``; ``demo``. Exit codes: 0 success, 1 a node
refused or failed (or a receipt or audit chain does not verify), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from federation import __version__, pki, receipts
from federation._train_cli import add_train_parser, run_train
from federation.coordinator import Coordinator, QueryResult
from federation.errors import (
    BudgetExhaustedError,
    ConfigError,
    FederationError,
    InvalidRequestError,
    PolicyError,
    SchemaMismatchError,
    UnauthenticatedError,
)
from federation.filters import parse_filter
from federation.queries import Count, Histogram, Mean, Mechanism, Quantile, Query, Sum
from federation.releases import BudgetStatus, NodeDescription

__all__ = ["main"]

QUERY_KINDS = ("count", "sum", "mean", "histogram", "quantile")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="federation", description="Privacy-preserving federated analytics."
    )
    parser.add_argument("--version", action="version", version=f"federation {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("describe", help="show each node's datasets and your budget there")
    p.add_argument("--config", type=Path, default=Path("federation.toml"))
    p.add_argument("--json", action="store_true", help="print JSON")

    q = sub.add_parser("query", help="ask the nodes for a DP statistic")
    q.add_argument("kind", choices=QUERY_KINDS)
    q.add_argument("--config", type=Path, default=Path("federation.toml"))
    q.add_argument("--dataset", required=True)
    q.add_argument("--column", help="numeric or category column (not for count)")
    q.add_argument("--where", help="filter, e.g. \"age >= 30 and housing == 'rent'\"")
    q.add_argument("--group-by", help="category or bool column")
    q.add_argument("--bounds", help="clamp bounds 'lower,upper' (default: the public bounds)")
    q.add_argument("--bins", type=int, help="histogram bins / quantile resolution")
    q.add_argument("--quantiles", default="0.5", help="comma-separated, e.g. 0.25,0.5,0.75")
    q.add_argument("--epsilon", type=float, required=True, help="epsilon to spend at each node")
    q.add_argument("--delta", type=float, default=0.0, help="delta per node (gaussian)")
    q.add_argument("--mechanism", choices=[m.value for m in Mechanism], default="laplace")
    q.add_argument("--min-nodes", type=int, help="answer from at least N reachable nodes")
    q.add_argument("--json", action="store_true", help="print one JSON object")

    n = sub.add_parser("node", help="node operator commands (serve, init)", add_help=False)
    n.add_argument("rest", nargs=argparse.REMAINDER)
    a = sub.add_parser(
        "audit", help="verify a node's audit chain; compliance report", add_help=False
    )
    a.add_argument("rest", nargs=argparse.REMAINDER)

    r = sub.add_parser("receipts", help="prove what you received from whom")
    rsub = r.add_subparsers(dest="receipts_command", required=True)
    rv = rsub.add_parser("verify", help="check the signed receipts in query results")
    rv.add_argument(
        "files",
        nargs="+",
        type=argparse.FileType("rb"),
        help="`federation query --json` output, a list of them, or a training checkpoint",
    )
    rv.add_argument("--ca", type=argparse.FileType("rb"), help="the federation CA certificate")
    rv.add_argument(
        "--node-cert",
        action="append",
        default=[],
        type=_node_key,
        metavar="[NODE=]PEM",
        help="trust this certificate (or NODE=public key) for a node (repeatable)",
    )

    add_train_parser(sub)

    c = sub.add_parser("certs", help="create a federation CA and issue certificates")
    csub = c.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser("init", help="create a CA in a directory")
    ci.add_argument("--out", type=Path, required=True)
    ci.add_argument("--name", default="federation-ca")
    cs = csub.add_parser("issue", help="issue a node or consumer certificate")
    cs.add_argument("--ca", type=Path, required=True, help="directory holding ca.pem/ca.key")
    cs.add_argument("--name", required=True)
    cs.add_argument("--role", choices=["node", "consumer"], required=True)
    cs.add_argument("--host", default="", help="node: comma-separated DNS names / IPs")
    cs.add_argument("--out", type=Path, help="output directory (default: the CA directory)")
    cs.add_argument("--days", type=int, default=397, help="validity in days")

    d = sub.add_parser("demo", help="run two local nodes on synthetic data and query them")
    d.add_argument("--rows", type=int, default=200_000, help="rows per node")
    d.add_argument("--epsilon", type=float, default=0.5, help="epsilon per query per node")
    d.add_argument("--seed", type=int, default=7)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] in (["node"], ["audit"]):
        # The node runtime lives in `nodes`, which this package never imports: run it as
        # its own program (same interpreter), replacing this process. `audit` reads a
        # node's state directory, so it is node code too.
        rest = args_list[1:] if args_list[0] == "node" else args_list
        os.execv(sys.executable, [sys.executable, "-m", "nodes", *rest])  # noqa: S606
    args = _parser().parse_args(args_list)
    try:
        if args.command == "describe":
            return _describe(args)
        if args.command == "query":
            return _query(args)
        if args.command == "certs":
            return _certs(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "receipts":
            return _verify_receipts(args)
        from federation.demo import run_demo

        return run_demo(rows=args.rows, epsilon=args.epsilon, seed=args.seed)
    except (ConfigError, InvalidRequestError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except FederationError as err:
        sys.stderr.write(f"error: {type(err).__name__}: {err}{_resume_hint(args, err)}\n")
        return 1
    except OSError as err:  # a path the user gave: missing, a directory, not writable
        sys.stderr.write(f"error: {_os_error(err)}\n")
        return 2
    except KeyboardInterrupt as err:
        # A training round's notes: which round stopped and which nodes had charged it.
        notes = "".join(f"; {note}" for note in getattr(err, "__notes__", ()))
        sys.stderr.write(f"interrupted{notes}{_resume_hint(args)}\n")
        return 130


def _resume_hint(args: argparse.Namespace, err: BaseException | None = None) -> str:
    """For a training job that stopped after a checkpoint: how to continue it.

    After a node's refusal (its budget, policy, authentication or schema), running the
    same command again meets the same refusal: the hint says so.
    """
    directory = getattr(args, "checkpoint_dir", None)
    if args.command == "train" and directory and (directory / "checkpoint.json").exists():
        again = "run the same command again" if args.resume else "add --resume"
        if isinstance(err, _REFUSALS):
            again = f"once the cause above is fixed, {again}"
        return f"; the last finished round is in {directory}: {again} to continue the job"
    return ""


# Refusals that a node repeats until someone changes something (unlike a node that was
# down, busy or slow, which a plain retry may get past).
_REFUSALS = (BudgetExhaustedError, PolicyError, UnauthenticatedError, SchemaMismatchError)


def _os_error(err: OSError) -> str:
    """``[Errno 21] Is a directory: 'x'`` as ``x: Is a directory``."""
    name = err.filename if err.filename is not None else ""
    return f"{name}: {err.strerror}" if name and err.strerror else str(err)


def _describe(args: argparse.Namespace) -> int:
    # Node by node: one node down must not hide what the others say.
    descriptions: dict[str, NodeDescription] = {}
    failures: dict[str, FederationError] = {}
    with Coordinator.from_config(args.config) as fed:
        for name, client in fed.clients.items():
            try:
                descriptions[name] = client.describe()
            except FederationError as err:
                failures[name] = err
    if args.json:
        document: dict[str, object] = {n: _description_dict(d) for n, d in descriptions.items()}
        document.update({n: {"error": f"{type(e).__name__}: {e}"} for n, e in failures.items()})
        print(json.dumps(document, indent=2))
    else:
        for desc in descriptions.values():
            print(format_description(desc))
    for name, failure in failures.items():
        sys.stderr.write(
            f"error: node {name!r} not described: {type(failure).__name__}: {failure}\n"
        )
    return 1 if failures else 0


def _description_dict(d: NodeDescription) -> dict[str, object]:
    return {
        "node": d.node_name,
        "jurisdiction": d.jurisdiction,
        "version": d.software_version,
        "consumer": d.consumer,
        "operations": list(d.allowed_operations),
        "budget": {
            "epsilon": d.budget.epsilon,
            "delta": d.budget.delta,
            "spent_epsilon": d.budget.spent_epsilon,
            "remaining_epsilon": d.budget.remaining_epsilon,
            "releases": d.budget.releases,
            "max_epsilon_per_release": d.budget.max_epsilon_per_release,
            "max_delta_per_release": d.budget.max_delta_per_release,
        },
        "datasets": [s.to_dict() for s in d.datasets],
    }


def _delta_cap(b: BudgetStatus) -> str:
    """`` (delta <= cap)`` when the node states its per-release delta cap, else ""."""
    cap = b.max_delta_per_release
    return f" (delta {cap:g})" if cap is not None else ""


def format_description(d: NodeDescription) -> str:
    """Render a node description for a terminal."""
    b = d.budget
    lines = [
        f"{d.node_name} ({d.jurisdiction}), federation {d.software_version}",
        f"  you are {d.consumer!r}; allowed: {', '.join(d.allowed_operations)}",
        f"  budget: epsilon {b.spent_epsilon:.4g} spent of {b.epsilon:g} "
        f"({b.remaining_epsilon:.4g} left, delta {b.delta:g}, "
        f"max {b.max_epsilon_per_release:g}{_delta_cap(b)} per release, {b.releases} releases)",
    ]
    for s in d.datasets:
        lines.append(f"  dataset {s.name!r}:")
        for c in s.columns:
            extra = ""
            if c.has_bounds:
                extra = f" [{c.lower:g}, {c.upper:g}]"
            elif c.domain:
                extra = " {" + ", ".join(c.domain) + "}"
            lines.append(f"    {c.name:<16} {c.type.value}{extra}")
    return "\n".join(lines)


def build_query(args: argparse.Namespace) -> Query:
    """Turn ``federation query`` arguments into a query value."""
    where = parse_filter(args.where) if args.where else None
    group_by = args.group_by or None
    if args.kind == "count":
        return Count(dataset=args.dataset, where=where, group_by=group_by)
    if not args.column:
        raise InvalidRequestError(f"{args.kind} needs --column")
    bounds = _parse_bounds(args.bounds) if args.bounds else None
    common = {
        "dataset": args.dataset,
        "column": args.column,
        "where": where,
        "group_by": group_by,
        "bounds": bounds,
    }
    if args.kind == "sum":
        return Sum(**common)
    if args.kind == "mean":
        return Mean(**common)
    if args.kind == "histogram":
        return Histogram(**common, bins=10 if args.bins is None else args.bins)
    try:
        quantiles = tuple(float(q) for q in args.quantiles.split(","))
    except ValueError as err:
        raise InvalidRequestError(
            f"--quantiles: expected numbers like 0.25,0.5,0.75; got {args.quantiles!r}"
        ) from err
    return Quantile(**common, quantiles=quantiles, bins=256 if args.bins is None else args.bins)


def _parse_bounds(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lower, upper = (float(p) for p in parts)
    except ValueError as err:
        raise InvalidRequestError(f"--bounds: expected 'lower,upper'; got {text!r}") from err
    return (lower, upper)


def _query(args: argparse.Namespace) -> int:
    query = build_query(args)
    with Coordinator.from_config(args.config) as fed:
        result = fed.analyze(
            query,
            epsilon=args.epsilon,
            delta=args.delta,
            mechanism=args.mechanism,
            min_nodes=args.min_nodes,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(format_result(result))
    return 0


def _number(value: float) -> str:
    """Counts and amounts in full with separators (40,012, not 4.001e+04); small and
    huge values with 4 significant digits."""
    if math.isfinite(value) and 1e3 <= abs(value) < 1e15:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def format_result(result: QueryResult, truth: dict[str, list[float]] | None = None) -> str:
    """Render a result as a table; ``truth`` adds exact values (synthetic data only)."""
    pct = round(result.confidence * 100)
    header = f"{'group':<14} {'':<18} {'DP estimate':>14} {f'{pct}% CI':>29}"
    if truth is not None:
        header += f" {'true value':>14}"
    lines = [header]
    for g in result.groups:
        for i, (label, e) in enumerate(zip(result.labels, g.estimates, strict=True)):
            ci = f"[{_number(e.low)}, {_number(e.high)}]"
            value = f"{_number(e.value):>14}"
            if e.suppressed:  # a node's min_cohort guard withheld it
                value, ci = f"{'suppressed':>14}", ""
            row = f"{(g.group or 'all') if i == 0 else '':<14} {label:<18} {value} {ci:>29}"
            if truth is not None:
                row += f" {_number(truth[g.group][i]):>14}"
            lines.append(row)
    lines.append(
        "cost: "
        + "; ".join(
            f"{n.node} epsilon {n.epsilon:g} (spent {n.spent_epsilon:.3g}, "
            f"left {n.remaining_epsilon:.3g}, receipt {n.receipt_id[:8]})"
            for n in result.nodes
        )
    )
    if result.missing:
        lines.append(f"missing nodes: {', '.join(result.missing)}")
    return "\n".join(lines)


def _node_key(text: str) -> tuple[str, bytes]:
    """``--node-cert [NODE=]PEM``: the node (default: the certificate's name) and the PEM."""
    node, sep, path = text.partition("=")
    if not sep:
        node, path = "", text
    with argparse.FileType("rb")(path) as handle:
        pem = handle.read()
    if not node:
        try:
            node = pki.common_name(pem)
        except InvalidRequestError as err:
            raise argparse.ArgumentTypeError(f"{path}: {err}; use NODE={path}") from err
    return node, pem


def _verify_receipts(args: argparse.Namespace) -> int:
    records: list[receipts.ReceiptRecord] = []
    for handle in args.files:
        with handle:
            try:
                document = json.load(handle)
            except ValueError as err:
                raise ConfigError(f"{handle.name} is not JSON: {err}") from err
        records += receipts.find_receipt_records(document)
    ca_pem = None
    if args.ca is not None:
        with args.ca:
            ca_pem = args.ca.read()
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as err:  # a usage error, not a failed receipt
            raise ConfigError(f"--ca {args.ca.name} is not a PEM certificate") from err
    if not records:
        raise ConfigError("no receipts in the given files (expected `federation query --json`)")
    results = receipts.verify_records(records, ca_pem=ca_pem, node_keys=dict(args.node_cert))
    for record, failure in results:
        r = record.receipt
        head = (
            f"{r.node_name:<14} receipt {r.id[:12]} release {r.sequence:<6} epsilon {r.epsilon:g}"
        )
        print(f"{head}  {'OK' if failure is None else 'FAILED: ' + failure}")
    failed = sum(1 for _, failure in results if failure is not None)
    anchor = "signing certificates issued by the given CA" if ca_pem else "keys given"
    print(f"{len(results)} receipts: {len(results) - failed} verified, {failed} failed ({anchor})")
    return 1 if failed else 0


def _certs(args: argparse.Namespace) -> int:
    if args.certs_command == "init":
        path = pki.init_ca(args.out, name=args.name)
        print(f"CA written: {path} (keep {path.with_suffix('.key').name} secret and offline)")
        return 0
    if args.days < 1:
        raise ConfigError(f"--days must be >= 1; got {args.days}")
    hosts = [h for h in args.host.split(",") if h]
    cert, key = pki.issue(
        args.ca,
        name=args.name,
        role=args.role,
        hosts=hosts,
        out_dir=args.out,
        validity_days=args.days,
    )
    print(f"issued {args.role} certificate {cert} and key {key} (mode 0600)")
    if args.role == "consumer" and "." in args.name:
        print(f'in a node config, quote the name: [consumers."{args.name}"]')
    return 0
