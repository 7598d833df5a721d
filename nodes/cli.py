"""``python -m nodes``: the node operator's commands (``federation node ...`` runs these).

``serve --config node.toml [--insecure] [--allow-broken-audit]`` runs a node (it verifies
the audit chain first); ``init DATA [--name ...]`` prints a commented starter config for a
CSV or Parquet file; ``audit verify|report --state-dir DIR`` checks the audit chain and
writes the compliance report (``nodes.audit_cli``). A bad config exits with code 2 and one
message naming the key.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from federation.errors import ConfigError
from nodes.audit_cli import main as audit_main
from nodes.config import starter_config
from nodes.server import serve

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="federation node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run a node from its config")
    p_serve.add_argument("--config", required=True, type=Path, help="path to node.toml")
    p_serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext (only on a loopback address; for development)",
    )
    p_serve.add_argument(
        "--allow-broken-audit",
        action="store_true",
        help="serve even if the audit chain fails verification (logged loudly and "
        "recorded in the chain)",
    )
    p_serve.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG, INFO, WARNING, ERROR",
    )
    p_init = sub.add_parser("init", help="print a commented starter node.toml for a data file")
    p_init.add_argument("data", type=Path, help="CSV or Parquet file")
    p_init.add_argument("--name", default="my-node", help="node name, e.g. hong-kong")
    p_init.add_argument("--jurisdiction", default="XX", help="jurisdiction code, e.g. HK")
    p_init.add_argument("--dataset", default=None, help="dataset name (default: file stem)")
    p_init.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    p_init.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    # Listed for --help; `audit ...` is dispatched to nodes.audit_cli before parsing.
    sub.add_parser("audit", help="verify the audit chain; compliance reports (audit --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a node command; return the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["audit"]:  # its own parser (and --help)
        return audit_main(arguments[1:])
    args = _parser().parse_args(arguments)
    try:
        if args.command == "serve":
            logging.basicConfig(
                level=args.log_level.upper(),
                stream=sys.stderr,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            return serve(
                args.config, insecure=args.insecure, allow_broken_audit=args.allow_broken_audit
            )
        text = starter_config(
            args.data, name=args.name, jurisdiction=args.jurisdiction, dataset=args.dataset
        )
        if args.out is None:
            sys.stdout.write(text)
            return 0
        # An existing node.toml is an operator's hand-edited policy: never clobber it.
        if args.out.exists() and not args.force:
            sys.stderr.write(f"error: {args.out} exists; pass --force to overwrite it\n")
            return 2
        args.out.write_text(text, encoding="utf-8")
        sys.stderr.write(f"wrote {args.out}\n")
        return 0
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except OSError as err:  # a path the operator gave: missing folder, a file, no permission
        where = f"{err.filename}: " if err.filename is not None else ""
        sys.stderr.write(f"error: {where}{err.strerror or err}\n")
        return 2
