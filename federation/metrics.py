"""Model-quality helpers for synthetic or the consumer's own data (never a node's data).

``roc_auc`` scores a model; ``evaluator`` makes the coordinator's own per-round
evaluation for ``train(evaluate=...)``; ``fit_centralized`` trains the non-private,
centralized reference that federated DP training is compared against (demo, notebooks,
benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from federation.errors import InvalidRequestError
from federation.models import ModelSpec, build_model

__all__ = ["evaluator", "fit_centralized", "predict", "roc_auc"]


def roc_auc(scores: npt.NDArray[np.floating], labels: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half.

    >>> roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    0.75
    """
    y = np.asarray(labels, dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise InvalidRequestError("ROC-AUC needs both positive and negative labels")
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    # Tied scores share their average rank, so a tie counts half (Mann-Whitney U).
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    u = float(ranks[y].sum()) - positives * (positives + 1) / 2.0
    return u / (positives * negatives)


def predict(
    model: nn.Module, x: npt.NDArray[np.float32], *, batch: int = 8192
) -> npt.NDArray[np.float64]:
    """The model's scores (logits) for encoded inputs ``x``, ``batch`` rows at a time (a
    wide model's activations over a whole large set would take gigabytes)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidRequestError(f"batch must be an integer >= 1; got {batch!r}")
    model.eval()
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    parts = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            parts.append(model(inputs[start : start + batch]).reshape(-1).double().numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def evaluator(
    x: npt.NDArray[np.floating], y: npt.NDArray[np.bool_]
) -> Callable[[nn.Module], dict[str, float]]:
    """The coordinator's own evaluation for ``train(evaluate=...)``: ROC-AUC, mean logistic
    loss and accuracy (logit > 0) of the model on encoded inputs ``x`` and labels ``y``
    (all NaN for a model with a non-finite score). The loss is not clamped per record as
    the nodes' DP loss is (at ``LOSS_UPPER``), so the two differ on badly wrong records.

    ``x`` is the consumer's own records encoded as the nodes encode theirs
    (``federation.models.encode_features`` with the nodes' schema).

    Raises:
        InvalidRequestError: ``x`` is not finite or not 2-D, ``y`` is not 1-D bool or
            0/1, they differ in length, or ``y`` lacks a class.
    """
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    raw = np.asarray(y)
    if raw.ndim != 1 or inputs.ndim != 2 or len(inputs) != len(raw):
        raise InvalidRequestError(
            f"x must be (records, inputs) with one label per record (y 1-D); got x "
            f"{inputs.shape} and y {raw.shape}"
        )
    if raw.dtype != bool and not (raw.dtype.kind in "iuf" and bool(np.isin(raw, (0, 1)).all())):
        raise InvalidRequestError(f"labels must be bool or 0/1; got {raw.dtype} values")
    if not np.isfinite(inputs).all():
        raise InvalidRequestError("x holds NaN or infinite values")
    labels = raw.astype(bool)
    if labels.all() or not labels.any():
        raise InvalidRequestError("evaluation labels need both classes (ROC-AUC is undefined)")
    targets = torch.from_numpy(labels.astype(np.float32))

    def evaluate(model: nn.Module) -> dict[str, float]:
        scores = predict(model, inputs)
        if not np.isfinite(scores).all():  # a diverged model: no figure looks plausible
            return {"auc": math.nan, "loss": math.nan, "accuracy": math.nan}
        logits = torch.from_numpy(scores)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets.double())
        return {
            "auc": roc_auc(scores, labels),
            "loss": float(loss),
            "accuracy": float(np.mean((scores > 0) == labels)),
        }

    return evaluate


def fit_centralized(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.bool_],
    *,
    spec: ModelSpec,
    epochs: int = 5,
    batch_size: int = 256,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> nn.Module:
    """Train ``spec`` without privacy on pooled data (Adam, BCE): the reference line."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(spec, input_dim=x.shape[1])
    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    targets = torch.from_numpy(np.asarray(y, dtype=np.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]).reshape(-1), targets[batch])
            loss.backward()
            optimizer.step()
    return model
