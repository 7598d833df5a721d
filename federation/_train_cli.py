"""``federation train``: federated DP training against the nodes of a ``federation.toml``.

Kept apart from ``federation.cli`` so that other commands never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from federation.errors import ConfigError, InvalidRequestError
from federation.training import DEFAULT_TENSOR_DIGEST, TENSOR_DIGESTS

if TYPE_CHECKING:
    from federation.coordinator.training import Evaluator, TrainingResult
    from federation.models import ModelBuilder

__all__ = ["add_train_parser", "format_history", "run_train"]

DEFAULT_MLP_HIDDEN = (64, 64)


class _DefaultsShown(argparse.HelpFormatter):
    """Help that names each option's default, where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default != argparse.SUPPRESS
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``train`` command to the CLI's subparsers."""
    t = sub.add_parser(
        "train",
        help="train a model across the nodes with DP-SGD at each node",
        description="Federated training: each node runs DP-SGD on its own records and "
        "returns a DP model update; the coordinator averages them each round.",
        formatter_class=_DefaultsShown,
    )
    t.add_argument(
        "--config", type=Path, default=Path("federation.toml"), help="the nodes and your identity"
    )
    t.add_argument("--dataset", required=True, help="the dataset's name at the nodes")
    t.add_argument(
        "--model",
        default="mlp",
        help="architecture the nodes build and allow you (allowed_models): logistic, mlp, "
        "wide-mlp, or one their operators registered (see --architecture)",
    )
    t.add_argument(
        "--architecture",
        action="append",
        default=[],
        metavar="NAME=TARGET",
        help="an architecture the nodes' operators registered, and where its builder is: "
        "NAME=package.module:function or NAME=file.py:function (repeatable)",
    )
    t.add_argument(
        "--hidden", default=None, help="hidden layer widths, e.g. 64,64 (default for mlp: 64,64)"
    )
    t.add_argument("--features", required=True, help="comma-separated input columns")
    t.add_argument("--target", required=True, help="the bool label column")
    t.add_argument("--rounds", type=int, required=True, help="federated rounds")
    t.add_argument(
        "--target-epsilon",
        type=float,
        required=True,
        help="epsilon of the whole job per node (a retried round is charged again)",
    )
    t.add_argument("--delta", type=float, default=1e-7, help="delta of the job per node")
    t.add_argument("--sample-rate", type=float, default=0.01, help="Poisson rate per step")
    t.add_argument("--local-steps", type=int, default=10, help="DP-SGD steps per round")
    t.add_argument("--learning-rate", type=float, default=0.5, help="local SGD step size")
    t.add_argument("--clip-norm", type=float, default=1.0, help="per-record gradient clip")
    t.add_argument(
        "--server-optimizer",
        choices=["fedavg", "fedadam", "fedyogi"],
        default="fedavg",
        help="how the coordinator steps from the round's average",
    )
    t.add_argument(
        "--server-lr",
        type=float,
        # The bound is federation.coordinator._aggregate.MAX_SERVER_LR (not imported here:
        # it would load torch for every command); a test keeps the two the same.
        help="> 0 and <= 1e+06; default 1 for fedavg, 0.01 otherwise",
    )
    t.add_argument(
        "--metrics-epsilon",
        type=float,
        default=0.0,
        help="> 0: DP validation loss/accuracy each round, charged per round on top of "
        "--target-epsilon",
    )
    t.add_argument(
        "--min-nodes", type=int, help="nodes that must complete each round (default: all)"
    )
    t.add_argument("--round-timeout", type=float, default=600.0, help="seconds per round")
    t.add_argument("--checkpoint-dir", type=Path, help="checkpoint after every round here")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    t.add_argument(
        "--tensor-digest",
        choices=TENSOR_DIGESTS,
        default=DEFAULT_TENSOR_DIGEST,
        help="hash the receipts commit to each update with (sha256: where a FIPS hash is required)",
    )
    t.add_argument(
        "--evaluate",
        metavar="TARGET",
        help="your own evaluation after every round, on your own data: "
        "package.module:function or file.py:function, called as function(model) -> "
        "{name: number} (e.g. returning federation.metrics.evaluator(x, y)(model)); "
        "shown as 'own NAME' in the progress bar and summary, no privacy cost",
    )
    t.add_argument("--out", type=Path, required=True, help="model file (.safetensors)")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out model (otherwise the job is refused before any "
        "round: that model cost privacy budget)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print one JSON object")


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError as err:
        raise InvalidRequestError(f"--hidden: expected widths like 64,64; got {text!r}") from err


def _hidden(text: str | None, model: str) -> tuple[int, ...]:
    if text is not None:
        return _widths(text)
    return DEFAULT_MLP_HIDDEN if model == "mlp" else ()


def _architectures(entries: list[str]) -> dict[str, ModelBuilder]:
    """Read ``--architecture NAME=TARGET`` options into builders."""
    from federation.architectures import load_builder

    builders: dict[str, ModelBuilder] = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        if not sep or not name or not target:
            raise InvalidRequestError(
                f"--architecture: expected NAME=package.module:function or "
                f"NAME=file.py:function; got {entry!r}"
            )
        try:
            builders[name] = load_builder(target, base_dir=Path.cwd())
        except ConfigError as err:
            raise ConfigError(f"--architecture {name}: {err}") from err
    return builders


def _evaluator(target: str | None) -> Evaluator | None:
    """Read ``--evaluate TARGET`` into the function ``train(evaluate=...)`` calls."""
    if target is None:
        return None
    from federation.architectures import load_callable

    try:
        function = load_callable(target, base_dir=Path.cwd(), call="(model)", args=1)
    except ConfigError as err:
        raise ConfigError(f"--evaluate: {err}") from err
    return function  # type: ignore[return-value]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def run_train(args: argparse.Namespace) -> int:
    """Run ``federation train``; return the exit code."""
    from federation.coordinator import Coordinator
    from federation.coordinator._checkpoint import check_output_file
    from federation.models import ModelSpec

    check_output_file(args.out, what="--out")  # before any round is charged
    if not args.overwrite and (args.out.exists() or _sidecar(args.out).exists()):
        raise InvalidRequestError(
            f"--out: {args.out} already holds a model; pass --overwrite to replace it, or "
            "choose another file (nothing was charged)"
        )
    if args.resume and args.checkpoint_dir is None:
        raise InvalidRequestError("--resume needs --checkpoint-dir (where the checkpoint is)")

    spec = ModelSpec(
        architecture=args.model,
        dataset=args.dataset,
        features=tuple(f.strip() for f in args.features.split(",") if f.strip()),
        target=args.target,
        hidden=_hidden(args.hidden, args.model),
    )
    architectures = _architectures(args.architecture)
    evaluate = _evaluator(args.evaluate)
    with Coordinator.from_config(args.config) as fed:
        result = fed.train(
            spec,
            rounds=args.rounds,
            target_epsilon=args.target_epsilon,
            delta=args.delta,
            sample_rate=args.sample_rate,
            local_steps=args.local_steps,
            learning_rate=args.learning_rate,
            clip_norm=args.clip_norm,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
            min_nodes=args.min_nodes,
            round_timeout_s=args.round_timeout,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            metrics_epsilon=args.metrics_epsilon,
            progress=not args.no_progress and not args.json,
            seed=args.seed,
            tensor_digest=args.tensor_digest,
            architectures=architectures,
            evaluate=evaluate,
        )
    sidecar = result.save(args.out)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.out),
                    "sidecar": str(sidecar),
                    "job_id": result.job_id,
                    "history": [r.to_dict() for r in result.history],
                }
            )
        )
    else:
        print(format_history(result))
        print(f"model saved: {args.out} (spec in {sidecar.name})")
    sys.stdout.flush()
    return 0


def format_history(result: TrainingResult) -> str:
    """Render a training job's rounds as a table: nodes, epsilon so far, DP metrics, time.

    Below it: why each node that missed a round last missed one, and each node whose job
    spend ended above what the job was planned to cost (a round charged twice).
    """
    nodes = sorted({n for r in result.history for n in r.job_epsilon})
    # The coordinator's own evaluation (train(evaluate=...)), in the order it reported.
    own = list(dict.fromkeys(name for r in result.history for name, _ in r.evaluation))
    header = f"{'round':>5} {'nodes':>6} " + " ".join(f"{'ε ' + n:>14}" for n in nodes)
    header += f" {'loss':>8} {'accuracy':>9} "
    header += "".join(f"{'own ' + name:>12} " for name in own)
    header += f"{'time s':>7}  missing"
    lines = [header]
    last_spent: dict[str, float] = {}
    reasons: dict[str, tuple[int, str]] = {}
    for r in result.history:
        eps = r.job_epsilon
        last_spent.update(eps)
        for node, reason in r.failures:
            reasons[node] = (r.round, reason)
        cells = " ".join(f"{eps[n]:>14.4g}" if n in eps else f"{'-':>14}" for n in nodes)
        loss, accuracy = r.metric("loss"), r.metric("accuracy")
        values = dict(r.evaluation)
        evaluated = "".join(
            f"{f'{values[name]:.4f}' if name in values else '-':>12} " for name in own
        )
        lines.append(
            f"{r.round + 1:>5} {len(r.nodes):>6} {cells} "
            f"{'-' if loss is None else f'{loss:.4f}':>8} "
            f"{'-' if accuracy is None else f'{accuracy:.4f}':>9} {evaluated}"
            f"{r.duration_s:>7.2f}  "
            + ", ".join(r.missing + tuple(f"{p} (partial)" for p in r.partial))
        )
    lines.append(f"job {result.job_id}: ε is each node's composed spend for this job so far")
    if own:
        lines.append("own …: the coordinator's evaluation of the global model on its own data")
    for node, (round_index, reason) in sorted(reasons.items()):
        short = reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"
        lines.append(f"{node} last missed round {round_index + 1}: {short}")
    planned = result.planned_epsilon
    if planned is not None:
        for node, spent in sorted(last_spent.items()):
            if spent > planned * (1 + 1e-3):
                lines.append(
                    f"{node}: job ε {spent:.4g} is above the {planned:.4g} this job was "
                    "planned to cost: a round that was retried (a timeout, a lost node, "
                    "--resume) is charged again"
                )
    return "\n".join(lines)


_REASON_CHARS = 240
