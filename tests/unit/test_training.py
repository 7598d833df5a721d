"""Tests for nodes.training: planning refusals, the DP-SGD step, and the released update."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

import nodes.training as training_module
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.errors import BudgetExhaustedError, ConfigError, InvalidRequestError, PolicyError
from federation.metrics import roc_auc
from federation.models import (
    MODEL_REGISTRY,
    ModelBuilder,
    ModelSpec,
    build_model,
    initial_arrays,
    state_to_arrays,
)
from federation.privacy import add_noise, compose
from federation.schema import Column, ColumnType, DatasetSchema
from nodes.config import ConsumerPolicy
from nodes.data import Table, table_from_arrays
from nodes.ledger import JobRecord
from nodes.noise import GaussianStream
from nodes.rounds import check_job, round_details
from nodes.training import (
    HOLDOUT_BUCKETS,
    LOSS_UPPER,
    TrainingEngine,
    TrainPlan,
    _add_rows,
    _check_float32_noise,
    _feature_matrix,
    _record_logits,
    _rows,
    _Stepper,
    _Tensors,
    clip_per_sample,
    clipped_gradient_sum,
    holdout_mask,
    job_epsilon,
    per_sample_gradients,
    plan_training,
    poisson_sample,
)

FEATURES = tuple(c.name for c in CREDIT_SCHEMA.columns if c.name != "defaulted")
POLICY = ConsumerPolicy(
    name="lab",
    epsilon=100.0,
    delta=1e-5,
    max_epsilon_per_release=10.0,
    max_delta_per_release=1e-6,
    operations=frozenset({"describe", "train"}),
    noise_multiplier_floor=0.3,
    max_rounds=20,
)


def _request(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "spec": ModelSpec("mlp", "credit", FEATURES, "defaulted", (16, 8)),
        "round": 0,
        "total_rounds": 4,
        "target_epsilon": 3.0,
        "delta": 1e-6,
        "sample_rate": 0.05,
        "local_steps": 25,
        "learning_rate": 1.0,
        "clip_norm": 1.0,
        "metrics_epsilon": 0.0,
        "job_id": "job-1",
        "schema": CREDIT_SCHEMA,
        "policy": POLICY,
    }
    request.update(overrides)
    return request


def _tanh_net(spec: ModelSpec, dim: int) -> nn.Module:
    """An operator architecture (not a Linear/ReLU stack): the generic per-sample path."""
    widths = (dim, *spec.hidden)
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(width_in, width_out), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1))


def _plan(**overrides: Any) -> TrainPlan:
    return plan_training(**_request(**overrides))


def _short(steps: int, **overrides: Any) -> TrainPlan:
    """A planned round cut to ``steps`` steps (the engine trusts its plan; keeps tests fast)."""
    return dataclasses.replace(_plan(**overrides), local_steps=steps)


@pytest.fixture(scope="module")
def table() -> Table:
    data = synthetic_credit(jurisdiction="hong-kong", rows=20_000, seed=11)
    return table_from_arrays(data, schema=CREDIT_SCHEMA)


@pytest.fixture(scope="module")
def engine(table: Table) -> TrainingEngine:
    return TrainingEngine(table)


# ------------------------------------------------------------------ planning


def test_plan_describes_the_round_before_touching_data() -> None:
    plan = _plan(metrics_epsilon=0.3)
    assert plan.charge == compose((plan.update_charge, plan.examples_charge, *plan.metrics_charges))
    assert plan.update_charge.mechanism == "dp_sgd"
    assert plan.update_charge.noise_scale == plan.noise_multiplier
    assert plan.examples_charge.epsilon == pytest.approx(3.0 * 0.01 / 4)
    assert sum(c.epsilon for c in plan.metrics_charges) == pytest.approx(0.3)
    assert plan.input_dim == 6 + 1 + 5 + 5  # 6 numeric, 1 bool, 2 one-hot blocks of 5
    assert plan.shapes == {
        "0.weight": (16, 17),
        "0.bias": (16,),
        "2.weight": (8, 16),
        "2.bias": (8,),
        "4.weight": (1, 8),
        "4.bias": (1,),
    }


def _bounds_free_schema() -> DatasetSchema:
    return DatasetSchema(
        name="credit",
        columns=(
            Column("age", ColumnType.INT),
            Column("defaulted", ColumnType.BOOL),
            Column("income", ColumnType.FLOAT, 0, 10),
        ),
    )


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"spec": ModelSpec("resnet", "credit", FEATURES, "defaulted")}, InvalidRequestError,
         "architecture 'resnet' is not known"),
        ({"policy": dataclasses.replace(POLICY, allowed_models=("logistic",))}, PolicyError,
         "'mlp' is not allowed for consumer 'lab'"),
        ({"total_rounds": 21}, InvalidRequestError, "total_rounds 21 exceeds .* max_rounds of 20"),
        ({"policy": dataclasses.replace(POLICY, noise_multiplier_floor=5.0)}, InvalidRequestError,
         "needs noise_multiplier .* below this node's noise_multiplier_floor of 5"),
        ({"spec": ModelSpec("mlp", "credit", ("age", "salary"), "defaulted", (4,))},
         InvalidRequestError, "no column 'salary'"),
        ({"spec": ModelSpec("logistic", "credit", ("age",), "income")}, InvalidRequestError,
         "target 'income' is float; the target must be a bool"),
        ({"spec": ModelSpec("logistic", "credit", ("age",), "defaulted"),
          "schema": _bounds_free_schema()}, InvalidRequestError, "'age' has no public bounds"),
        ({"spec": ModelSpec("logistic", "loans", ("age",), "defaulted")}, InvalidRequestError,
         "model.dataset 'loans' does not match"),
        ({"spec": ModelSpec("mlp", "credit", FEATURES, "defaulted", (5000,))},
         InvalidRequestError, "widths must be 1-4096"),
        ({"learning_rate": float("nan")}, InvalidRequestError, "learning_rate must be a finite"),
        ({"clip_norm": float("inf")}, InvalidRequestError, "clip_norm must be a finite"),
        ({"clip_norm": 0.0}, InvalidRequestError, "clip_norm must be a finite"),
        ({"sample_rate": 0.0}, InvalidRequestError, r"sample_rate must be in \[1e-09, 1\]"),
        ({"sample_rate": 1.5}, InvalidRequestError, r"sample_rate must be in \[1e-09, 1\]"),
        ({"sample_rate": 1e-18}, InvalidRequestError, r"sample_rate must be in \[1e-09, 1\]"),
        ({"local_steps": 0}, InvalidRequestError, "local_steps must be an integer 1-10000"),
        ({"local_steps": 10_001}, InvalidRequestError, "local_steps must be an integer 1-10000"),
        ({"round": 4}, InvalidRequestError, r"round must be an integer in \[0, total_rounds=4\)"),
        ({"total_rounds": 0}, InvalidRequestError, "total_rounds must be an integer >= 1"),
        ({"job_id": ""}, InvalidRequestError, "job_id"),
        ({"target_epsilon": float("nan")}, InvalidRequestError, "target_epsilon must be a finite"),
        ({"target_epsilon": -1.0}, InvalidRequestError, "target_epsilon must be a finite"),
        ({"metrics_epsilon": -0.1}, InvalidRequestError, "metrics_epsilon must be a finite"),
        ({"delta": 0.0}, InvalidRequestError, "delta must satisfy 0 < delta < 1"),
        ({"delta": 1e-5}, PolicyError, "delta 1e-05 exceeds .* cap of 1e-06"),
        ({"target_epsilon": 10.5}, BudgetExhaustedError,
         "target_epsilon 10.5 exceeds this node's per-release cap of 10"),
        ({"metrics_epsilon": 11.0}, BudgetExhaustedError, "metrics_epsilon 11 exceeds"),
    ],
)  # fmt: skip
def test_plan_training_refuses(
    overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _plan(**overrides)


def test_a_smaller_epsilon_gets_more_noise() -> None:
    assert _plan(target_epsilon=1.0).noise_multiplier > _plan(target_epsilon=8.0).noise_multiplier


# ------------------------------------------------------------------ per-sample clipping


def _batch(rows: int = 64, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(rows, dim, generator=generator) * 4
    y = (torch.rand(rows, generator=generator) < 0.4).float()
    return x, y


def _model(architecture: str = "mlp", hidden: tuple[int, ...] = (12, 7)) -> nn.Module:
    spec = ModelSpec(architecture, "credit", tuple(f"f{i}" for i in range(6)), "t", hidden)
    model = build_model(spec, input_dim=6)
    arrays = initial_arrays(spec, input_dim=6, seed=4)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    return model


@pytest.mark.parametrize("clip_norm", [1e-3, 0.1])
def test_clipped_per_sample_gradients_are_within_the_clip_norm(clip_norm: float) -> None:
    x, y = _batch()
    raw = per_sample_gradients(_model(), x, y)
    clipped, norms = clip_per_sample(raw, clip_norm)
    after = torch.stack([g.flatten(1).square().sum(1) for g in clipped.values()]).sum(0).sqrt()
    assert bool(torch.all(norms > clip_norm))  # every record was actually clipped
    assert bool(torch.all(after <= clip_norm))
    np.testing.assert_allclose(after.numpy(), clip_norm, rtol=1e-4)


def test_per_sample_gradients_match_one_backward_per_record() -> None:
    model = _model()
    x, y = _batch(rows=5)
    grads = per_sample_gradients(model, x, y)
    for i in range(5):
        model.zero_grad()
        logit = model(x[i : i + 1]).reshape(())
        nn.functional.binary_cross_entropy_with_logits(logit, y[i]).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None
            torch.testing.assert_close(grads[name][i], param.grad)


@pytest.mark.parametrize("architecture", ["mlp", "logistic"])
@pytest.mark.parametrize("clip_norm", [1e-3, 0.5, 1e6])
def test_fast_clipped_sum_equals_the_materialised_one(architecture: str, clip_norm: float) -> None:
    model = _model(architecture, (12, 7) if architecture == "mlp" else ())
    x, y = _batch()
    sums, norms = clipped_gradient_sum(model, x, y, clip_norm=clip_norm)
    clipped, expected_norms = clip_per_sample(per_sample_gradients(model, x, y), clip_norm)
    torch.testing.assert_close(norms, expected_norms)
    assert sums.keys() == clipped.keys()
    for name, value in clipped.items():
        torch.testing.assert_close(sums[name], value.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", [1, 200, 10**9])  # one record, a few, all at once
def test_any_module_is_clipped_a_bounded_chunk_of_records_at_a_time(
    budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator picks the sample rate: a whole batch's per-sample gradients of a
    # large model would exhaust memory after the charge. Chunks give the same sums.
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))  # not a stack
    x, y = _batch()
    clipped, expected_norms = clip_per_sample(per_sample_gradients(model, x, y), 0.5)
    seen: list[int] = []
    whole = training_module.per_sample_gradients

    def counting(m: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(xs.shape[0])
        return whole(m, xs, ys)

    monkeypatch.setattr(training_module, "_PER_SAMPLE_VALUES", budget)
    monkeypatch.setattr(training_module, "per_sample_gradients", counting)
    sums, norms = clipped_gradient_sum(model, x, y, clip_norm=0.5)
    params = sum(p.numel() for p in model.parameters())
    assert max(seen) == max(1, min(x.shape[0], budget // params))
    assert sum(seen) == x.shape[0]
    torch.testing.assert_close(norms, expected_norms)
    for name, value in clipped.items():
        torch.testing.assert_close(sums[name], value.sum(0), rtol=1e-5, atol=1e-6)


def _plain_step(
    plan: TrainPlan, table: Table, weights: dict[str, npt.NDArray[np.float32]], seed: int
) -> dict[str, npt.NDArray[np.float32]]:
    """One non-private SGD step on the batch the engine samples from ``seed``."""
    train = ~holdout_mask(table)
    x = torch.from_numpy(_feature_matrix(table, plan.spec.features)[train])
    y = torch.from_numpy(table.column(plan.spec.target).astype(np.float32)[train])
    rng = np.random.default_rng(seed)
    rng.bytes(16)  # the engine first draws its noise key
    # then draws the round's DP count, which the step normalises by (never the true n)
    n_dp = float(add_noise(np.array([len(y)], dtype=np.int64), plan.examples_charge, rng=rng)[0])
    index = torch.from_numpy(poisson_sample(len(y), plan.sample_rate, rng))
    model = build_model(plan.spec, input_dim=plan.input_dim)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    logits = model(x[index]).reshape(-1)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, y[index], reduction="none")
    # Normalised by the expected batch size q * n_dp (Opacus uses q * n).
    (losses.sum() / max(plan.sample_rate * n_dp, 1.0)).backward()
    with torch.no_grad():
        for param in model.parameters():
            assert param.grad is not None
            param -= plan.learning_rate * param.grad
    return state_to_arrays(model)


@pytest.mark.parametrize("sample_rate", [1.0, 0.2])
def test_dp_step_without_noise_or_clipping_is_the_plain_step(
    engine: TrainingEngine, table: Table, sample_rate: float
) -> None:
    plan = dataclasses.replace(
        _plan(), local_steps=1, sample_rate=sample_rate, noise_multiplier=1e-12, clip_norm=1e9
    )
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=2)
    update = engine.train(plan, weights, rng=np.random.default_rng(21))
    expected = _plain_step(plan, table, weights, seed=21)
    for name, value in expected.items():
        assert not np.allclose(value, weights[name])  # the step moved every tensor
        np.testing.assert_allclose(update.weights[name], value, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the engine


def test_auc_helper_known_answers() -> None:
    labels = np.array([False, False, True, True])
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert roc_auc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


def test_dp_training_improves_held_out_auc(engine: TrainingEngine) -> None:
    spec = ModelSpec("logistic", "credit", FEATURES, "defaulted")
    rounds = 4
    test = table_from_arrays(
        synthetic_credit(jurisdiction="hong-kong", rows=10_000, seed=99), schema=CREDIT_SCHEMA
    )
    x_test = torch.from_numpy(_feature_matrix(test, FEATURES))
    labels = np.asarray(test.column("defaulted"), dtype=np.bool_)
    model = build_model(spec, input_dim=x_test.shape[1])

    def auc(weights: dict[str, npt.NDArray[np.float32]]) -> float:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        with torch.no_grad():
            return roc_auc(model(x_test).reshape(-1).double().numpy(), labels)

    weights = initial_arrays(spec, input_dim=x_test.shape[1], seed=0)
    before = auc(weights)
    rng = np.random.default_rng(5)
    for r in range(rounds):
        plan = _plan(spec=spec, round=r, total_rounds=rounds, target_epsilon=3.0,
                     sample_rate=0.05, local_steps=50, learning_rate=4.0)  # fmt: skip
        weights = engine.train(plan, weights, rng=rng).weights
    after = auc(weights)
    assert after > max(before, 0.5) + 0.1
    assert after > 0.7


def test_training_is_reproducible_from_the_injected_rng(engine: TrainingEngine) -> None:
    plan = _short(3)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=1)
    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    first = engine.train(plan, weights, rng=np.random.default_rng(8))
    torch.testing.assert_close(torch.rand(3), expected_global)  # global RNG untouched
    again = engine.train(plan, weights, rng=np.random.default_rng(8))
    other = engine.train(plan, weights, rng=np.random.default_rng(9))
    for name in weights:
        np.testing.assert_array_equal(first.weights[name], again.weights[name])
        assert not np.array_equal(first.weights[name], other.weights[name])
    assert first.noisy_examples == again.noisy_examples


def test_gradient_noise_is_keyed_by_128_bits_of_the_rng(
    engine: TrainingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The noise is what hides the gradient from a coordinator that can zero it on chosen
    # coordinates; torch's generator kept 32 bits of a per-round seed. The key must be the
    # rng's first 16 bytes, and it must decide the noise: flip one bit, other updates.
    import nodes.training as training

    keys: list[bytes] = []

    class _Recording(GaussianStream):
        def __init__(self, key: bytes, **kwargs: Any) -> None:
            keys.append(key)
            super().__init__(key, **kwargs)

    monkeypatch.setattr(training, "GaussianStream", _Recording)
    plan = dataclasses.replace(_short(1), local_steps=1)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=1)
    first = engine.train(plan, weights, rng=np.random.default_rng(8))
    assert keys == [np.random.default_rng(8).bytes(16)]

    class _FlippedKey(np.random.Generator):
        def bytes(self, length: int) -> bytes:
            key = bytearray(super().bytes(length))
            key[-1] ^= 1  # the last bit: far past any 32-bit seed
            return bytes(key)

    flipped = engine.train(plan, weights, rng=_FlippedKey(np.random.PCG64(8)))
    assert keys[1][:-1] == keys[0][:-1]
    assert keys[1] != keys[0]
    assert first.noisy_examples == flipped.noisy_examples  # same draws but the noise
    for name in weights:
        assert not np.array_equal(first.weights[name], flipped.weights[name])


def test_training_in_place_matches_the_copying_path_and_shares_buffers(
    engine: TrainingEngine,
) -> None:
    plan = _short(3)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=1)
    kept = {name: array.copy() for name, array in weights.items()}
    copied = engine.train(plan, weights, rng=np.random.default_rng(8))
    for name in weights:  # the copying path leaves its input alone
        np.testing.assert_array_equal(weights[name], kept[name])
    adopted = engine.train(plan, weights, rng=np.random.default_rng(8), in_place=True)
    for name in weights:
        np.testing.assert_array_equal(adopted.weights[name], copied.weights[name])
        assert np.shares_memory(adopted.weights[name], weights[name])  # no copy made
    read_only = {name: array.copy() for name, array in kept.items()}
    for array in read_only.values():
        array.flags.writeable = False
    again = engine.train(plan, read_only, rng=np.random.default_rng(8), in_place=True)
    for name in weights:  # buffers torch cannot share are copied, never written
        np.testing.assert_array_equal(again.weights[name], copied.weights[name])
        np.testing.assert_array_equal(read_only[name], kept[name])


@pytest.mark.parametrize("architecture", ["mlp", "tanh_net"])
def test_dp_sgd_noise_has_the_planned_scale_on_every_tensor(
    engine: TrainingEngine, architecture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Empty batches (no training rows) isolate the noise: every step must move every
    # coordinate of every tensor by N(0, (step_size * sigma * C)^2), independently. Hidden
    # width 1000 gives a 64,000-value weight: with noise blocks of 32,768 values (set here:
    # the node's are larger, and a model that spans several would make the test slow), one
    # full block and a partial one. Tolerances are 6 standard errors of each statistic.
    monkeypatch.setattr(training_module, "_NOISE_CHUNK_CPU", 1 << 15)
    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "tanh_net": _tanh_net}
    spec = ModelSpec(architecture, "credit", FEATURES, "defaulted", (64, 1000))
    policy = dataclasses.replace(POLICY, allowed_models=("mlp", "tanh_net"))
    plan = dataclasses.replace(
        plan_training(**_request(spec=spec, policy=policy), registry=registry), local_steps=1
    )
    data = engine._tensors(plan.spec.features, plan.spec.target)
    empty = dataclasses.replace(data, train_x=data.train_x[:0], train_y=data.train_y[:0])
    model = build_model(plan.spec, input_dim=plan.input_dim, registry=registry)
    stepper = _Stepper(model, empty, plan, GaussianStream(bytes([3]) * 16), examples=1e4)
    expected = stepper.step_size * stepper.sigma
    named = dict(model.named_parameters())
    steps = 200
    moves: dict[str, list[torch.Tensor]] = {name: [] for name in named}
    rng = np.random.default_rng(3)
    for _ in range(steps):
        before = {name: p.detach().clone() for name, p in named.items()}
        stepper.step(rng)
        for name, p in named.items():
            moves[name].append((p.detach() - before[name]).double().reshape(-1))
    assert max(p.numel() for p in named.values()) == 64_000
    for name, parts in moves.items():
        change = torch.cat(parts)
        n = change.numel()
        assert change.std().item() == pytest.approx(expected, rel=6 / (2 * n) ** 0.5), name
        assert abs(change.mean().item()) < 6 * expected / n**0.5, name
    # Slices of one tensor, and steps, draw fresh noise (no reused or re-seeded stream).
    big = next(name for name, p in named.items() if p.numel() == 64_000)
    first, second = moves[big][0][:32_768], moves[big][0][32_768:65_536]
    later = moves[big][1][:32_768]
    for other in (second, later):
        width = min(first.numel(), other.numel())
        r = torch.corrcoef(torch.stack([first[:width], other[:width]]))[0, 1].item()
        assert abs(r) < 6 / width**0.5


def test_update_releases_weights_count_and_metrics(engine: TrainingEngine, table: Table) -> None:
    plan = _short(2, metrics_epsilon=1.0)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=1)
    update = engine.train(plan, weights, rng=np.random.default_rng(1))
    assert update.steps == 2
    assert {k: v.shape for k, v in update.weights.items()} == plan.shapes
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in update.weights.values())
    train_rows = int((~holdout_mask(table)).sum())
    noise = update.examples_noise
    assert noise.scale == pytest.approx(1 / plan.examples_charge.epsilon)
    assert abs(update.noisy_examples - train_rows) < 30 * noise.scale
    metrics = {name: value for name, value, _ in update.metrics}
    assert set(metrics) == {"loss", "accuracy"}
    assert 0.0 <= metrics["loss"] <= 10.0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert engine.train(_short(1), weights, rng=np.random.default_rng(1)).metrics == ()


def test_train_rejects_weights_that_do_not_fit(engine: TrainingEngine) -> None:
    plan = _short(1)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=1)
    weights["0.weight"] = weights["0.weight"][:, :-1].copy()
    with pytest.raises(InvalidRequestError, match="'0.weight' must have shape"):
        engine.train(plan, weights, rng=np.random.default_rng(0))


def test_operator_architectures_train_through_the_generic_path(table: Table) -> None:
    def tanh_net(spec: ModelSpec, dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, 4), nn.Tanh(), nn.Linear(4, 1))

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "tanh_net": tanh_net}
    policy = dataclasses.replace(POLICY, allowed_models=("tanh_net",))
    spec = ModelSpec("tanh_net", "credit", FEATURES, "defaulted")
    plan = plan_training(**_request(spec=spec, policy=policy, local_steps=2), registry=registry)
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    update = TrainingEngine(table, registry=registry).train(
        plan, weights, rng=np.random.default_rng(0)
    )
    assert update.weights.keys() == weights.keys()
    assert not np.array_equal(update.weights["0.weight"], weights["0.weight"])


class _Counting(nn.Module):
    """Counts records seen in a buffer, in any mode: a buffer training must not change."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return x


@pytest.mark.parametrize("sample_rate", [1e-9, 0.5])
def test_batch_norm_and_dropout_train_in_eval_mode_and_keep_their_statistics(
    table: Table, sample_rate: float
) -> None:
    # Train mode leaked the held-out features' exact mean through BatchNorm's running
    # statistics (released with the weights, without noise), and made the per-sample path
    # fail only when a batch was sampled (a data-dependent failure after the charge).
    def bn_net(spec: ModelSpec, dim: int) -> nn.Module:
        return nn.Sequential(
            nn.BatchNorm1d(dim), nn.Linear(dim, 4), nn.Dropout(0.5), nn.Linear(4, 1)
        )

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "bn_net": bn_net}
    policy = dataclasses.replace(POLICY, allowed_models=("bn_net",))
    spec = ModelSpec("bn_net", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=2, metrics_epsilon=0.5),
        registry=registry,
    )
    plan = dataclasses.replace(plan, sample_rate=sample_rate)
    # The integer num_batches_tracked goes as a float32 scalar (0-d: a review found it
    # sent 1-d, which the node refused).
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    assert weights["0.num_batches_tracked"].shape == ()
    engine = TrainingEngine(table, registry=registry)
    engine.preflight(plan, weights)
    update = engine.train(plan, weights, rng=np.random.default_rng(0))
    for name in ("0.running_mean", "0.running_var", "0.num_batches_tracked"):
        np.testing.assert_array_equal(update.weights[name], weights[name])
    assert update.metrics


class _QuietCounting(_Counting):
    """Counts only in passes without autograd (evaluation): the per-sample pass runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.seen += x.shape[0]
        return x


def test_what_an_architecture_writes_while_evaluating_never_reaches_the_release(
    table: Table,
) -> None:
    # It writes its buffer in the metrics pass only (gradients off): that pass runs on
    # copies of the parameters and buffers, so the released buffer is the one received.
    def quiet(spec: ModelSpec, dim: int) -> nn.Module:
        return nn.Sequential(_QuietCounting(), nn.Linear(dim, 1))

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "quiet": quiet}
    policy = dataclasses.replace(POLICY, allowed_models=("quiet",))
    spec = ModelSpec("quiet", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    engine.preflight(plan, weights)
    update = engine.train(plan, weights, rng=np.random.default_rng(0))
    assert update.metrics
    np.testing.assert_array_equal(update.weights["0.seen"], weights["0.seen"])


class _Wide(nn.Module):
    """One wide hidden layer, its activation functional: not a built-in stack."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_an_operator_architectures_evaluation_batch_is_bounded_by_its_width(
    table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held-out rows went through an operator's forward 65,536 at a time whatever its
    # width: a wide model's activations could take gigabytes, after the charge. Its batch
    # is now bounded by what its modules output for one row, with the same metrics.
    def wide(spec: ModelSpec, dim: int) -> nn.Module:
        return _Wide(dim, 512)

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "wide": wide}
    policy = dataclasses.replace(POLICY, allowed_models=("wide",))
    spec = ModelSpec("wide", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    key = bytes(range(16))
    whole = engine.train(plan, weights, rng=np.random.default_rng(3), noise_key=key)
    seen: list[int] = []
    real = training_module._record_logits

    def spy(model: nn.Module) -> Any:
        logits = real(model)

        def counted(x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return logits(x)

        return counted

    # 512 + 1 + 1 module output values a row: batches of 40 rows.
    monkeypatch.setattr(training_module, "_GHOST_VALUES", 514 * 40)
    monkeypatch.setattr(training_module, "_record_logits", spy)
    bounded = engine.train(plan, weights, rng=np.random.default_rng(3), noise_key=key)
    held = int(holdout_mask(table).sum())
    assert held > 400
    assert seen[0] == 1  # the measurement
    assert max(seen[1:]) == 40
    assert sum(seen[1:]) == held
    assert bounded.metrics == whole.metrics


class _Doubling(nn.Module):
    """Writes its input in place, as a careless operator's forward might."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.linear(x)


def test_a_forward_that_writes_its_input_never_changes_the_held_out_records(
    table: Table,
) -> None:
    # Found by review: the metrics pass gave the forward views of the cached held-out
    # rows; x.mul_(2) doubled them for every later round's metrics.
    def doubling(spec: ModelSpec, dim: int) -> nn.Module:
        return _Doubling(dim)

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "doubling": doubling}
    policy = dataclasses.replace(POLICY, allowed_models=("doubling",))
    spec = ModelSpec("doubling", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    data = engine._tensors(plan.spec.features, plan.spec.target)
    held_out = data.holdout_x.clone()
    for seed in range(2):
        assert engine.train(plan, weights, rng=np.random.default_rng(seed)).metrics
    assert torch.equal(data.holdout_x, held_out)


class _Centring(nn.Module):
    """Subtracts the batch's mean: each output depends on every row of the batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x - x.mean(0))


class _Recording(nn.Module):
    """Writes the data's mean into a parameter when gradients are off (evaluation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.centre = nn.Parameter(torch.zeros(dim))
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            self.centre.data.copy_(x.mean(0))
        return self.linear(x - self.centre)


def test_metrics_see_each_record_alone_whatever_the_forward_mixes(table: Table) -> None:
    # Batched, one record would move every record's loss (found by review: 369 times the
    # loss sum's sensitivity): the metrics pass runs the forward once per record.
    def centring(spec: ModelSpec, dim: int) -> nn.Module:
        return _Centring(dim)

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "centring": centring}
    policy = dataclasses.replace(POLICY, allowed_models=("centring",))
    spec = ModelSpec("centring", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    model = engine._model(plan, weights, in_place=False)
    data = engine._tensors(spec.features, spec.target)
    x = data.holdout_x[:50]
    with torch.no_grad():
        together = _record_logits(model)(x)
        alone = torch.cat([model(x[i : i + 1]).reshape(1) for i in range(50)])
        mixed = model(x).reshape(50)
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(mixed, alone)  # the batched forward does mix them
    engine.preflight(plan, weights)
    assert engine.train(plan, weights, rng=np.random.default_rng(0)).metrics


def test_an_architecture_that_writes_data_into_a_parameter_is_refused_before_the_charge(
    table: Table,
) -> None:
    # Its metrics pass would release the held-out mean as a "parameter" (review finding).
    def recording(spec: ModelSpec, dim: int) -> nn.Module:
        return _Recording(dim)

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "recording": recording}
    policy = dataclasses.replace(POLICY, allowed_models=("recording",))
    spec = ModelSpec("recording", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    with pytest.raises(InvalidRequestError, match="'recording' cannot be trained"):
        engine.preflight(plan, weights)
    # Trained anyway, the write cannot reach what is released: it fails, or leaves the
    # parameter as DP-SGD made it (never the data's mean).
    sent = weights["centre"].copy()
    try:
        update = engine.train(
            dataclasses.replace(plan, sample_rate=1e-9), weights, rng=np.random.default_rng(0)
        )
    except RuntimeError:
        return
    np.testing.assert_array_equal(update.weights["centre"], sent)


def test_a_nan_buffer_left_alone_is_unchanged(table: Table) -> None:
    def sentinel(spec: ModelSpec, dim: int) -> nn.Module:
        model = nn.Sequential(nn.Tanh(), nn.Linear(dim, 1))
        model.register_buffer("missing", torch.tensor([math.nan]), persistent=False)
        return model

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "sentinel": sentinel}
    policy = dataclasses.replace(POLICY, allowed_models=("sentinel",))
    spec = ModelSpec("sentinel", "credit", FEATURES, "defaulted")
    plan = plan_training(**_request(spec=spec, policy=policy, local_steps=1), registry=registry)
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    engine.preflight(plan, weights)
    engine.train(plan, weights, rng=np.random.default_rng(0))


def test_the_train_handler_preflights_before_it_charges() -> None:
    # Nodes run as processes in the end-to-end tests: read the order from the source.
    from nodes.service import NodeService

    tree = ast.parse(textwrap.dedent(inspect.getsource(NodeService)))
    [handler] = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and "trainer.preflight(" in ast.unparse(node)
    ]
    body = ast.unparse(handler)
    assert 0 < body.index("trainer.preflight(") < body.index("self.ledger.charge(")


def test_an_architecture_that_changes_a_buffer_is_refused_and_releases_nothing(
    table: Table,
) -> None:
    def counting(spec: ModelSpec, dim: int) -> nn.Module:
        return nn.Sequential(_Counting(), nn.Linear(dim, 1))

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "counting": counting}
    policy = dataclasses.replace(POLICY, allowed_models=("counting",))
    spec = ModelSpec("counting", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    # Before the charge: refused, on made-up rows (its per-sample pass cannot run).
    with pytest.raises(InvalidRequestError, match="'counting' cannot be trained"):
        engine.preflight(plan, weights)
    # And were it trained anyway, with a batch, the per-sample pass refuses to run it (the
    # engine's own buffer check stands behind that), so nothing is released.
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    full = dataclasses.replace(plan, sample_rate=0.5)
    with pytest.raises(RuntimeError, match="mutate a captured Tensor|changed its buffer"):
        engine.train(full, weights, rng=np.random.default_rng(0))


def test_in_place_training_materialises_buffers_the_weights_do_not_carry(table: Table) -> None:
    class Scaled(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.linear = nn.Linear(dim, 1)
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "scaled": lambda s, d: Scaled(d)}
    policy = dataclasses.replace(POLICY, allowed_models=("scaled",))
    spec = ModelSpec("scaled", "credit", FEATURES, "defaulted")
    plan = plan_training(**_request(spec=spec, policy=policy, local_steps=2), registry=registry)
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    update = engine.train(plan, weights, rng=np.random.default_rng(0), in_place=True)
    again = engine.train(plan, weights, rng=np.random.default_rng(0))
    for name in weights:
        np.testing.assert_array_equal(update.weights[name], again.weights[name])
    # The buffer's value comes from the constructor (it is not in the weights).
    assert engine._model(plan, weights, in_place=True).scale.item() == 2.0


@pytest.mark.parametrize("device", ["no-such-device", "mps"])
def test_engine_refuses_a_device_it_cannot_train_on(table: Table, device: str) -> None:
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match=f"training device {device!r} is not available"):
        TrainingEngine(table, device=device)


# ------------------------------------------------------------------ data preparation


def test_features_are_scaled_by_public_bounds_and_one_hot(table: Table) -> None:
    matrix = _feature_matrix(table, ("age", "employment", "has_mortgage"))
    assert matrix.dtype == np.float32
    assert matrix.shape == (table.rows, 1 + 5 + 1)
    age = np.asarray(table.column("age"), dtype=np.float64)
    np.testing.assert_allclose(matrix[:, 0], (age - 18) / (90 - 18), rtol=1e-6)
    np.testing.assert_array_equal(matrix[:, 1:6].sum(1), 1.0)
    np.testing.assert_array_equal(matrix[:, 1:6].argmax(1), table.column("employment"))
    np.testing.assert_array_equal(matrix[:, 6], table.column("has_mortgage"))


def test_holdout_depends_only_on_each_record(table: Table) -> None:
    mask = holdout_mask(table)
    assert abs(mask.mean() - 1 / HOLDOUT_BUCKETS) < 0.01
    keep = np.ones(table.rows, dtype=np.bool_)
    keep[[0, 5, 777]] = False  # a neighbouring table: three records removed, rest reordered
    order = np.random.default_rng(0).permutation(int(keep.sum()))
    columns = {name: values[keep][order] for name, values in table.columns.items()}
    neighbour = Table(schema=table.schema, columns=columns, rows=int(keep.sum()))
    np.testing.assert_array_equal(holdout_mask(neighbour), mask[keep][order])


def test_poisson_sample_is_sorted_unique_and_in_range() -> None:
    rng = np.random.default_rng(0)
    for n, rate in ((1000, 0.01), (50, 0.9), (10, 1.0), (0, 0.5), (1, 1e-6)):
        index = poisson_sample(n, rate, rng)
        assert index.dtype == np.int64
        assert np.all(np.diff(index) > 0)
        assert index.size == 0 or (index[0] >= 0 and index[-1] < n)
    np.testing.assert_array_equal(poisson_sample(10, 1.0, rng), np.arange(10))
    # Gaps near int64's limit (a rate of 1e-18) must not wrap around into the range.
    for _ in range(200):
        assert poisson_sample(1000, 1e-18, rng).size == 0


# ------------------------------------------------------------------ review regressions


def test_update_is_normalised_by_the_dp_count_not_the_true_count(
    engine: TrainingEngine,
) -> None:
    # The update's noise spread is lr * sigma / divisor: a true-n divisor would publish n.
    plan = _short(1)
    data = engine._tensors(plan.spec.features, plan.spec.target)
    model = build_model(plan.spec, input_dim=plan.input_dim)
    stepper = _Stepper(model, data, plan, GaussianStream(bytes(16)), examples=1234.0)
    assert stepper.step_size == pytest.approx(plan.learning_rate / (plan.sample_rate * 1234.0))
    assert data.train_x.shape[0] != 1234


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": 1e300}, "learning_rate must be <="),
        ({"clip_norm": 1e30}, "clip_norm must be <="),
    ],
)
def test_values_that_would_overflow_after_the_charge_are_refused_first(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _plan(**overrides)


@pytest.mark.parametrize("clip_norm", [0.51 * 2.0**-149, 2.0**-140, 1e-7])
def test_a_clip_norm_too_small_for_float32_noise_is_refused_first(clip_norm: float) -> None:
    # At 0.51 * 2**-149 (accepted before): float32(clip) is the smallest subnormal, and
    # float32(sigma * clip) with sigma < 1 rounds to 0, so the update was the batch's
    # clipped sum with no noise at all, for a charge of epsilon ~1.
    with pytest.raises(InvalidRequestError, match="clip_norm must be >= 1e-06"):
        _plan(clip_norm=clip_norm)


def test_a_noise_scale_float32_cannot_carry_is_refused() -> None:
    _check_float32_noise(0.978, 1e-6)  # the smallest clip: fine
    _check_float32_noise(1.0, 1.0)
    for sigma, clip in ((1e-33, 1e-6), (0.978, 0.51 * 2.0**-149)):
        with pytest.raises(InvalidRequestError, match="not representable in float32"):
            _check_float32_noise(sigma, clip)


def test_a_job_over_the_per_release_cap_with_its_metrics_is_refused() -> None:
    # A training job is one release. target 9 in one round plus metrics 9: each alone is
    # under the cap of 10. Target 6 over 5 rounds with metrics 2 per round: every round
    # (and the target) fits, the job composed does not.
    with pytest.raises(
        BudgetExhaustedError, match="this job would cost epsilon 17.92 over its 1 rounds"
    ):
        _plan(target_epsilon=9.0, metrics_epsilon=9.0, total_rounds=1)
    plan = _plan(target_epsilon=6.0, metrics_epsilon=0.0, total_rounds=5)
    assert plan.charge.epsilon < 10
    assert job_epsilon(plan, rounds=5) <= 6.0
    with pytest.raises(BudgetExhaustedError, match=r"cost epsilon 1\d\.\d+ over its 5 rounds"):
        _plan(target_epsilon=6.0, metrics_epsilon=2.0, total_rounds=5)
    assert (
        job_epsilon(_plan(target_epsilon=6.0, metrics_epsilon=0.5, total_rounds=5), rounds=5) < 10
    )


@pytest.mark.parametrize(
    ("target", "metrics", "rounds"), [(1.0, 0.0, 10), (0.9, 0.05, 10), (3.0, 0.3, 4), (8.0, 1.0, 1)]
)
def test_the_coordinator_computes_the_job_cost_the_node_checks(
    target: float, metrics: float, rounds: int
) -> None:
    # Coordinators leave out a node whose Describe caps a release below this cost before
    # asking anyone; it must be the node's own number, or nodes get charged for rounds
    # another node then refuses.
    from federation.coordinator.training import _job_cost

    plan = _plan(target_epsilon=target, metrics_epsilon=metrics, total_rounds=rounds)
    config = {
        "target_epsilon": target,
        "metrics_epsilon": metrics,
        "delta": plan.delta,
        "sample_rate": plan.sample_rate,
        "local_steps": plan.local_steps,
    }
    assert _job_cost(config, rounds) == max(target, metrics, job_epsilon(plan, rounds=rounds))


# ------------------------------------------------------------------ floating point vs DP


def _all_in_every_batch(x: torch.Tensor, y: torch.Tensor) -> _Tensors:
    """Training tensors of these records only (at sample rate 1 every step takes them all)."""
    return _Tensors(train_x=x, train_y=y, holdout_x=x[:0], holdout_y=y[:0])


def _one_step(
    plan: TrainPlan,
    weights: dict[str, npt.NDArray[np.float32]],
    data: _Tensors,
    registry: dict[str, ModelBuilder],
) -> dict[str, torch.Tensor]:
    """The weights after one DP-SGD step, with fixed noise and sampling seeds."""
    model = build_model(plan.spec, input_dim=plan.input_dim, registry=registry)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    stepper = _Stepper(model, data, plan, GaussianStream(bytes([9]) * 16), examples=1.0)
    stepper.step(np.random.default_rng(0))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _one_step_plan(
    architecture: str, **changes: Any
) -> tuple[dict[str, ModelBuilder], ModelSpec, TrainPlan]:
    """A one-step, every-record plan (noise multiplier 0.5) for mlp or tanh_net (64, 32)."""
    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "tanh_net": _tanh_net}
    spec = ModelSpec(architecture, "credit", FEATURES, "defaulted", (64, 32))
    policy = dataclasses.replace(POLICY, allowed_models=("mlp", "tanh_net"))
    planned = plan_training(**_request(spec=spec, policy=policy), registry=registry)
    plan = dataclasses.replace(
        planned, local_steps=1, sample_rate=1.0, noise_multiplier=0.5, **changes
    )
    return registry, spec, plan


@pytest.mark.parametrize("architecture", ["mlp", "tanh_net"])
def test_the_noise_joins_the_clipped_sum_before_the_weights_round_it(architecture: str) -> None:
    # With step * gradient near the float spacing of the weights, rounding w - step * sum
    # before the noise is added would publish the un-noised sum through the rounding. The
    # release must be w - step * (sum + noise) rounded once: post-processing of the noisy sum.
    registry, spec, plan = _one_step_plan(architecture, learning_rate=3e-7)
    x, y = _batch(rows=3, dim=plan.input_dim)
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=5, registry=registry)
    # The same noise draws, alone: from zero weights with no records to train on.
    zeros = {name: np.zeros_like(a) for name, a in weights.items()}
    noise = _one_step(plan, zeros, _all_in_every_batch(x[:0], y[:0]), registry)
    released = _one_step(plan, weights, _all_in_every_batch(x, y), registry)

    model = build_model(spec, input_dim=plan.input_dim, registry=registry)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    sums, _ = clipped_gradient_sum(model, x, y, clip_norm=plan.clip_norm)
    step = plan.learning_rate  # q * n_dp = 1
    agree_once = agree_twice = total = 0
    for name, w in weights.items():
        w64 = torch.from_numpy(w).double()
        step_noise = -noise[name].double()  # step * noise, as the zero weights took it
        step_sum = step * sums[name].double()
        once = (w64 - (step_sum + step_noise)).float()
        twice = ((w64 - step_sum).float().double() - step_noise).float()
        agree_once += int((released[name] == once).sum())
        agree_twice += int((released[name] == twice).sum())
        total += w.size
    assert agree_once >= 0.999 * total  # (the float32 sum + noise may round a hair apart)
    assert agree_twice <= 0.95 * total  # the setting tells the two orders apart


@pytest.mark.parametrize("architecture", ["mlp", "tanh_net"])
def test_a_huge_clipped_sum_does_not_round_the_noise_away(architecture: str) -> None:
    # Millions of records that all push one coordinate make a sum S near 5e7 * clip. In
    # float32 S + noise moved in steps of 4 (ulp(5e7)), so noise of sigma 0.5 rounded away
    # and S showed to one record (a review ran it at 30M rows: N, N+1, N+2 each gave one
    # fixed value). The sum is now taken over records in float64 and meets the noise
    # there; only the noisy sum is rounded for the weights.
    registry, spec, plan = _one_step_plan(architecture)
    x, y = _batch(rows=3, dim=plan.input_dim)
    model = build_model(spec, input_dim=plan.input_dim, registry=registry)
    stepper = _Stepper(
        model, _all_in_every_batch(x, y), plan, GaussianStream(bytes(16)), examples=1.0
    )
    sums = stepper._clipped_sum(x, y)
    for part in sums:  # summed over records in float64 (a Linear's in parts: _add_rows)
        if not isinstance(part, tuple):
            assert part.dtype == torch.float64
    huge = 5e7 * plan.clip_norm
    stepper._clipped_sum = lambda x, y: [  # type: ignore[method-assign]
        torch.full(_rows(p).shape, huge, dtype=torch.float64) for p in model.parameters()
    ]
    stepper.step(np.random.default_rng(0))
    noise = stepper.noise - huge  # the last block: the noise the sum met, unrounded
    sigma = plan.noise_multiplier * plan.clip_norm
    assert noise.std().item() == pytest.approx(sigma, rel=6 / (2 * noise.numel()) ** 0.5)


def _logistic_stepper(x: torch.Tensor, y: torch.Tensor, clip_norm: float) -> _Stepper:
    spec = ModelSpec("logistic", "credit", FEATURES, "defaulted")
    plan = dataclasses.replace(
        _plan(spec=spec), local_steps=1, sample_rate=1.0, clip_norm=clip_norm
    )
    model = nn.Linear(x.shape[1], 1)
    return _Stepper(model, _all_in_every_batch(x, y), plan, GaussianStream(bytes(16)), examples=1.0)


def _summed(stepper: _Stepper, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each parameter's clipped sum as the step adds it to the noise (float64)."""
    out = []
    for part, param in zip(stepper._clipped_sum(x, y), stepper.model.parameters(), strict=True):
        rows = torch.zeros(_rows(param).shape, dtype=torch.float64)
        _add_rows(rows, part, 0, rows.shape[0])
        out.append(rows)
    return out


def test_a_structured_sum_over_many_records_is_exact_to_float64() -> None:
    # A review's case: one feature alternating between two values, zero weights. Float32
    # parts of 4,096 records each rounded the same way, so dropping one record moved the
    # sum by ~N * 2**-24 * clip (1.45 clips at 40M records). The products are float64 now.
    n = 100_000
    x = torch.where(torch.arange(n) % 2 == 0, 0.5166, 0.9971).reshape(-1, 1).float()
    y = torch.zeros(n)
    stepper = _logistic_stepper(x, y, clip_norm=1.0)
    with torch.no_grad():
        stepper.model.weight.zero_()
        stepper.model.bias.zero_()
    weight, bias = _summed(stepper, x, y)
    # The same sum in float64 from the float32 inputs: g = 0.5, norm = g sqrt(x^2 + 1).
    x64 = x.double().reshape(-1)
    norms = 0.5 * torch.sqrt(x64**2 + 1)
    factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    assert abs(weight.item() - float((0.5 * factors * x64).sum())) <= 1e-6
    assert abs(bias.item() - float((0.5 * factors).sum())) <= 1e-6


def test_a_gradient_too_small_for_float32_squares_is_still_clipped() -> None:
    # Weights that make activations ~1e19 and g ~ 1e-23: in float32 |g|^2 underflowed to
    # 0, the norm read 0 and the record went unclipped (2.6e-4 against a clip of 1e-6).
    x = torch.tensor([[1.8e19], [1.8e19]])
    y = torch.zeros(2)
    stepper = _logistic_stepper(x, y, clip_norm=1e-6)
    with torch.no_grad():
        stepper.model.weight.fill_(-53.0 / 1.8e19)
        stepper.model.bias.zero_()
    weight, bias = _summed(stepper, x, y)
    total = float(torch.sqrt(weight.pow(2).sum() + bias.pow(2).sum()))
    assert 0.0 < total <= 2 * 1e-6


def test_a_record_whose_gradient_overflows_contributes_nothing() -> None:
    # A coordinator's finite but huge weights overflow one record's activations: its
    # gradient is inf/NaN, and clipping cannot bound it. Unless it is dropped, the update
    # turns NaN exactly when that record is in the batch.
    spec = ModelSpec("mlp", "credit", ("a", "b"), "y", (1,))
    plan = dataclasses.replace(
        _plan(), spec=spec, input_dim=2, local_steps=1, sample_rate=1.0, learning_rate=1.0
    )
    weights = {
        "0.weight": np.array([[3e38, 3e38]], np.float32),
        "0.bias": np.array([-3e38], np.float32),
        "2.weight": np.array([[1.0]], np.float32),
        "2.bias": np.array([0.0], np.float32),
    }
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # the last one overflows
    y = torch.tensor([1.0, 0.0, 1.0])
    registry = dict(MODEL_REGISTRY)
    with_it = _one_step(plan, weights, _all_in_every_batch(x, y), registry)
    without = _one_step(plan, weights, _all_in_every_batch(x[:2], y[:2]), registry)
    for name in weights:
        assert bool(torch.isfinite(with_it[name]).all()), name
        torch.testing.assert_close(with_it[name], without[name], rtol=0, atol=0)
    # The same records through the generic (torch.func) path.
    model = build_model(spec, input_dim=2)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    clipped, norms = clip_per_sample(per_sample_gradients(model, x, y), clip_norm=1.0)
    assert not bool(torch.isfinite(norms[2]))
    assert all(
        bool(torch.all(g[2] == 0)) and bool(torch.isfinite(g).all()) for g in clipped.values()
    )


def test_a_held_out_record_with_an_overflowing_loss_counts_as_the_worst_loss(
    engine: TrainingEngine,
) -> None:
    # NaN loss for one record must neither fail the round (a data-dependent error, after
    # the charge) nor poison the DP sum: it counts as LOSS_UPPER.
    spec = ModelSpec("mlp", "credit", ("a", "b"), "y", (2,))
    model = build_model(spec, input_dim=2)
    weights = {
        "0.weight": [[3e38, 3e38], [3e38, 3e38]],
        "0.bias": [0.0, 0.0],
        "2.weight": [[1.0, -1.0]],
        "2.bias": [0.0],
    }
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # logits 3e38 - 3e38 = 0 and inf - inf = NaN
    y = torch.tensor([1.0, 0.0])
    data = _Tensors(train_x=x[:0], train_y=y[:0], holdout_x=x, holdout_y=y)
    loss_grid, correct, n = engine._evaluate(model, data, granularity=1.0, center=0.0)
    assert (n, correct) == (2, 1)  # a NaN logit predicts 0, which the second record is
    assert loss_grid == 1 + LOSS_UPPER  # log(2) on the unit grid, then the NaN one


class _OddParameters(nn.Module):
    """An operator architecture with a scalar, a zero-size and a 3-D parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.unused = nn.Parameter(torch.zeros(0, 3))
        self.cube = nn.Parameter(torch.full((2, 2, 2), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale + self.cube.sum() + self.unused.sum()


def test_parameters_of_any_shape_get_their_clipped_sum_and_noise() -> None:
    # Zero-size ((0, 3)), scalar and 3-D parameters: each coordinate takes its clipped sum
    # and one draw of noise (sigma tiny here, so the step equals the clipped sum).
    model = _OddParameters(6)
    x, y = _batch(rows=5)
    plan = dataclasses.replace(
        _plan(), local_steps=1, sample_rate=1.0, learning_rate=1.0, noise_multiplier=1e-12
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sums, _ = clipped_gradient_sum(model, x, y, clip_norm=plan.clip_norm)
    stepper = _Stepper(
        model, _all_in_every_batch(x, y), plan, GaussianStream(bytes(16)), examples=1.0
    )
    stepper.step(np.random.default_rng(0))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name] - sums[name], rtol=1e-5, atol=1e-7)


def test_a_linear_layer_used_twice_takes_the_exact_generic_path() -> None:
    # The per-layer norm identity treats each use as its own layer: it understated the
    # record's norm (up to 1.12x the clip got through) and kept one use's sum.
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                          nn.Linear(4, 1))  # fmt: skip
    x, y = _batch(rows=16)
    # Two Linear modules sharing one weight are the same case.
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    sharing = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), first, nn.ReLU(), second, nn.ReLU(),
                            nn.Linear(4, 1))  # fmt: skip
    for tied in (model, sharing):
        sums, norms = clipped_gradient_sum(tied, x, y, clip_norm=1e-3)
        clipped, expected = clip_per_sample(per_sample_gradients(tied, x, y), 1e-3)
        torch.testing.assert_close(norms, expected)
        for name, value in clipped.items():
            torch.testing.assert_close(sums[name], value.sum(0), rtol=1e-5, atol=1e-8)


def test_a_job_is_held_to_its_first_rounds_settings_and_to_max_rounds() -> None:
    plan = _plan()
    first = json.loads(json.dumps(round_details(plan)))  # as the ledger stores it
    check_job(dataclasses.replace(plan, round=1), JobRecord(first, 1), POLICY)  # next round
    check_job(plan, JobRecord(first, 3), POLICY)  # a retried round, within max_rounds
    with pytest.raises(InvalidRequestError, match="was started here with total_rounds=4"):
        check_job(_plan(total_rounds=1), JobRecord(first, 1), POLICY)
    with pytest.raises(PolicyError, match="charged 20 rounds at this node"):
        check_job(plan, JobRecord(first, POLICY.max_rounds), POLICY)
    check_job(plan, JobRecord(None, 0), POLICY)  # a new job


def test_a_nodes_train_handler_keys_the_noise_from_the_os_csprng() -> None:
    # Not from the request's PCG64 rng, whose later outputs feed released noisy counts.
    from nodes.service import NodeService, system_noise_key

    assert inspect.signature(NodeService).parameters["noise_keys"].default is system_noise_key
    keys = {system_noise_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(key) == 16 for key in keys)
    # And the handler passes one to every round it trains (nodes run as processes in the
    # end-to-end tests, so read the call from the source, as test_boundaries does).
    tree = ast.parse(inspect.getsource(NodeService))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "train"
    ]
    assert calls
    for call in calls:
        key = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("noise_key")
        assert key == "self.noise_keys()", ast.unparse(call)


class _OneLogitPerBatch(nn.Module):
    """Returns the batch's mean logit: one value for the whole batch, not one per record."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).mean()


def _pinned(spec: ModelSpec, dim: int) -> nn.Module:
    return nn.Linear(dim, 1, device="cpu")  # ignores the device the node builds on


def _budget_raising(spec: ModelSpec, dim: int) -> nn.Module:
    raise BudgetExhaustedError("the builder's own error")


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        (lambda spec, dim: nn.Sequential(nn.LazyLinear(1)), "state cannot be read"),
        (_pinned, "puts its tensors on a device itself"),
        # Not RESOURCE_EXHAUSTED: the consumer's budget is not what ran out.
        (_budget_raising, "cannot be built .*BudgetExhaustedError: the builder's own error"),
    ],
    ids=["lazy-layers", "pinned-device", "builder-raises-budget-error"],
)
def test_a_builder_that_misbehaves_is_refused_as_invalid_before_the_charge(
    builder: ModelBuilder, message: str
) -> None:
    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "odd": builder}
    policy = dataclasses.replace(POLICY, allowed_models=("odd",))
    spec = ModelSpec("odd", "credit", FEATURES, "defaulted")
    with pytest.raises(InvalidRequestError, match=message):
        plan_training(**_request(spec=spec, policy=policy), registry=registry)


def test_a_model_past_the_consumers_max_model_parameters_is_refused() -> None:
    spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", (64, 64))
    capped = dataclasses.replace(POLICY, max_model_parameters=4_000)
    with pytest.raises(InvalidRequestError, match=r"has 5,\d{3} values; .*max_model_parameters"):
        plan_training(**_request(spec=spec, policy=capped))
    # The default holds the largest mlp there is (1024 inputs, 8 layers of 4096).
    assert ConsumerPolicy(name="x", epsilon=1.0).max_model_parameters > 121_671_681
    plan_training(**_request(spec=spec))


def test_a_forward_that_gives_one_logit_per_batch_runs_per_record_in_every_pass(
    table: Table,
) -> None:
    # Batched, its metrics pass failed on the output's shape after the charge (review
    # finding); the node runs an operator's forward once per record, so it gets one logit.
    def batch_mean(spec: ModelSpec, dim: int) -> nn.Module:
        return _OneLogitPerBatch(dim)

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "batch-mean": batch_mean}
    policy = dataclasses.replace(POLICY, allowed_models=("batch-mean",))
    spec = ModelSpec("batch-mean", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=2, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    engine.preflight(plan, weights)
    assert engine.train(plan, weights, rng=np.random.default_rng(0)).metrics


def _centring_hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
    return out - out.mean(0, keepdim=True)


def test_a_linear_stack_with_a_hook_takes_the_per_record_path() -> None:
    # A forward hook can mix rows: the batched fast paths would let one record move every
    # record's clipped term and metric (review finding). With any hook, no fast path.
    model = nn.Sequential(nn.Linear(3, 1))
    model[0].register_forward_hook(_centring_hook)
    x = torch.zeros(4, 3)
    neighbour = x.clone()
    neighbour[3] = 100.0
    y = torch.ones(4)
    with torch.no_grad():
        torch.testing.assert_close(
            _record_logits(model)(x)[:3], _record_logits(model)(neighbour)[:3]
        )
    _, norms = clipped_gradient_sum(model, x, y, clip_norm=1.0)
    _, moved = clipped_gradient_sum(model, neighbour, y, clip_norm=1.0)
    torch.testing.assert_close(norms[:3], moved[:3])
    plain = nn.Sequential(nn.Linear(3, 1))
    assert training_module._linear_stack(plain) is not None
    assert training_module._linear_stack(model) is None
    plain.forward = lambda x: x  # type: ignore[method-assign]
    assert training_module._linear_stack(plain) is None


class _Remembering(nn.Module):
    """Keeps the last batch in a Python attribute: the next pass would read it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.previous: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.previous is not None:
            out = out + self.previous.sum()
        self.previous = x.detach()
        return out


def test_a_forward_that_keeps_a_record_in_an_attribute_is_refused_before_the_charge(
    table: Table,
) -> None:
    # Per-record passes in chunks: record i of one chunk would show in record i of the
    # next, and training records in the held-out metrics (review finding).
    def remembering(spec: ModelSpec, dim: int) -> nn.Module:
        return _Remembering(dim)

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "remembering": remembering}
    policy = dataclasses.replace(POLICY, allowed_models=("remembering",))
    spec = ModelSpec("remembering", "credit", FEATURES, "defaulted")
    plan = plan_training(
        **_request(spec=spec, policy=policy, local_steps=1, metrics_epsilon=0.5),
        registry=registry,
    )
    weights = initial_arrays(spec, input_dim=plan.input_dim, seed=0, registry=registry)
    engine = TrainingEngine(table, registry=registry)
    with pytest.raises(
        InvalidRequestError, match="keeps a tensor computed during a per-record pass"
    ):
        engine.preflight(plan, weights)
    # Trained anyway, the first pass that keeps a value stops the round: nothing released.
    with pytest.raises(
        RuntimeError, match=r"keeps a tensor computed during a per-record pass in previous"
    ):
        engine.train(
            dataclasses.replace(plan, sample_rate=0.5), weights, rng=np.random.default_rng(0)
        )


def test_the_model_size_cap_counts_buffers_the_weights_do_not_carry() -> None:
    # A non-persistent buffer is built for real at the node, sized by the coordinator's
    # hidden widths: it counts (review finding).
    class Projected(nn.Module):
        def __init__(self, dim: int, width: int) -> None:
            super().__init__()
            self.linear = nn.Linear(width, 1)
            self.register_buffer("proj", torch.zeros(dim, width), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x @ self.proj)

    def projected(spec: ModelSpec, dim: int) -> nn.Module:
        return Projected(dim, spec.hidden[0])

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "projected": projected}
    policy = dataclasses.replace(POLICY, allowed_models=("projected",), max_model_parameters=5000)
    spec = ModelSpec("projected", "credit", FEATURES, "defaulted", (1000,))
    with pytest.raises(InvalidRequestError, match=r"has \d+,\d{3} values; .*max_model_parameters"):
        plan_training(**_request(spec=spec, policy=policy), registry=registry)


def test_a_sequential_holding_a_tensor_of_its_own_is_not_a_plain_stack() -> None:
    # Taken as a stack, its extra parameter had no place in the fast path's sums and the
    # round failed after the charge, only when a record was sampled (review finding).
    model = nn.Sequential(nn.Linear(3, 1))
    model.register_parameter("temperature", nn.Parameter(torch.ones(1)))
    assert training_module._linear_stack(model) is None
    buffered = nn.Sequential(nn.Linear(3, 1))
    buffered.register_buffer("scale", torch.ones(1))
    assert training_module._linear_stack(buffered) is None


def test_global_module_hooks_cost_the_fast_path_and_are_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training_module, "_WARNED_GLOBAL_HOOKS", False)
    model = nn.Sequential(nn.Linear(3, 1))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with caplog.at_level("WARNING", logger="nodes.training"):
            assert training_module._linear_stack(model) is None
            assert training_module._linear_stack(model) is None
    finally:
        handle.remove()
    assert [r.message for r in caplog.records].count(
        "global torch module hooks are installed in this process (a profiler, a module "
        "tracker, an operator's builder?): every model trains on the slower per-record path"
    ) == 1
    assert training_module._linear_stack(model) is not None  # back once it is removed


def test_a_large_batch_goes_through_the_fast_path_in_bounded_chunks(
    engine: TrainingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sample_rate 1 on ~18,000 training records: held factored, the whole batch's
    # activations (float32 and float64) would grow with the data, after the charge; a
    # consumer could make a round fail, or not, by the number of records. Chunks of
    # records go into float64 sums instead, with the same result.
    spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", (16, 8))
    plan = dataclasses.replace(_plan(spec=spec), local_steps=1, sample_rate=1.0)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=0)
    key = bytes(range(16))
    whole = engine.train(plan, weights, rng=np.random.default_rng(5), noise_key=key)
    seen: list[int] = []
    real = training_module._ghost_factors

    def spy(layers: list[nn.Module], x: torch.Tensor, *args: Any) -> Any:
        seen.append(x.shape[0])
        return real(layers, x, *args)

    monkeypatch.setattr(training_module, "_GHOST_VALUES", 50_000)
    monkeypatch.setattr(training_module, "_ghost_factors", spy)
    chunked = engine.train(plan, weights, rng=np.random.default_rng(5), noise_key=key)
    layers = training_module._linear_stack(build_model(spec, input_dim=plan.input_dim))
    assert layers is not None
    rows = training_module._ghost_rows(layers)
    assert sum(seen) > 10_000  # the whole batch went through
    assert max(seen) <= rows < 2_000
    for name, array in whole.weights.items():
        np.testing.assert_allclose(chunked.weights[name], array, rtol=1e-6, atol=1e-7)


def test_whether_a_round_takes_dense_sums_is_decided_from_the_dp_count_not_the_batch(
    engine: TrainingEngine,
) -> None:
    # The dense float64 sums cost 8 bytes a parameter: taken or not by the released DP
    # count, its noise scale and the sample rate, before any batch is drawn.
    spec = ModelSpec("mlp", "credit", FEATURES, "defaulted", (16, 8))
    plan = _plan(spec=spec)
    data = engine._tensors(plan.spec.features, plan.spec.target)
    model = build_model(plan.spec, input_dim=plan.input_dim)
    stream = GaussianStream(bytes(16))
    layers = training_module._linear_stack(model)
    assert layers is not None
    rows = training_module._ghost_rows(layers, factored=True)
    few = _Stepper(model, data, dataclasses.replace(plan, sample_rate=1e-4), stream, examples=1e4)
    assert few.dense is None
    every = _Stepper(model, data, dataclasses.replace(plan, sample_rate=1.0), stream, examples=1e6)
    assert every.dense is not None
    assert rows < 1e6  # a batch of every record would not fit one chunk
    # Same count, whatever the data behind it: the same decision.
    empty = dataclasses.replace(data, train_x=data.train_x[:0], train_y=data.train_y[:0])
    again = _Stepper(model, empty, dataclasses.replace(plan, sample_rate=1.0), stream, examples=1e6)
    assert again.dense is not None
