"""The function probe: a node refuses, before any charge, a round whose model it builds
differently from the coordinator (same tensor names and shapes, another forward)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from federation.coordinator._aggregate import ServerOptimizer
from federation.coordinator.training import _Job, _probe, _probe_registry
from federation.datasets import CREDIT_SCHEMA, synthetic_credit
from federation.errors import InvalidRequestError
from federation.models import (
    MODEL_REGISTRY,
    PROBE_ROWS,
    PROBE_TOLERANCE,
    ModelBuilder,
    ModelSpec,
    build_model,
    initial_arrays,
    probe_difference,
    probe_inputs,
    probe_logits,
)
from federation.training import TrainConfig
from nodes.config import ConsumerPolicy
from nodes.data import Table, table_from_arrays
from nodes.training import TrainingEngine, TrainPlan, _linear_stack, plan_training

FEATURES = ("age", "income", "debt_ratio", "employment")
POLICY = ConsumerPolicy(
    name="lab",
    epsilon=100.0,
    delta=1e-5,
    max_epsilon_per_release=10.0,
    max_delta_per_release=1e-6,
    operations=frozenset({"describe", "train"}),
    noise_multiplier_floor=0.3,
    max_rounds=20,
    allowed_models=("net",),
)


def _net(activation: type[nn.Module]) -> ModelBuilder:
    def build(spec: ModelSpec, dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, 8), activation(), nn.Linear(8, 1))

    return build


def _plan(registry: dict[str, ModelBuilder]) -> TrainPlan:
    return plan_training(
        spec=ModelSpec("net", "credit", FEATURES, "defaulted"),
        round=0,
        total_rounds=2,
        target_epsilon=3.0,
        delta=1e-6,
        sample_rate=0.05,
        local_steps=1,
        learning_rate=1.0,
        clip_norm=1.0,
        metrics_epsilon=0.0,
        job_id="job-1",
        schema=CREDIT_SCHEMA,
        policy=POLICY,
        registry=registry,
    )


@pytest.fixture(scope="module")
def table() -> Table:
    return table_from_arrays(
        synthetic_credit(jurisdiction="hong-kong", rows=500, seed=3), schema=CREDIT_SCHEMA
    )


def test_probe_rows_are_fixed_public_values_where_records_lie() -> None:
    rows = probe_inputs(5)
    assert rows.shape == (PROBE_ROWS, 5)
    assert rows.dtype == np.float32
    assert rows.min() >= 0.0  # encoded records lie in [0, 1]: a forward finite on them
    assert rows.max() < 1.0  # (x.sqrt(), x.log1p()) is finite on the probe
    np.testing.assert_array_equal(rows, probe_inputs(5))  # same everywhere, no state
    assert not np.array_equal(probe_inputs(6)[:, :5], rows)  # each width its own rows
    # Pinned: a coordinator and a node of other versions must compute the same rows. The
    # first 12 bytes of SHAKE-256("federation-probe-v2:5") are f81ad1c9 4b196c62 4d5402fc;
    # as little-endian u32 / 2**32:
    np.testing.assert_allclose(rows[0, :3], [0.7883469, 0.3844620, 0.9844105], rtol=1e-6)
    with pytest.raises(InvalidRequestError):
        probe_inputs(0)


def test_probe_difference_separates_another_forward_from_rounding() -> None:
    expected = (0.5, -1.0, 2.0, 0.0, 0.25, -0.75, 1.5, 0.1)
    assert probe_difference(expected, expected) == 0.0
    nudged = tuple(v * (1 + 1e-5) for v in expected)  # another BLAS, TF32
    assert probe_difference(expected, nudged) < PROBE_TOLERANCE
    moved = (*expected[:-1], 0.2)
    assert probe_difference(expected, moved) == pytest.approx(0.1 / (2.0 + 1e-3))
    assert probe_difference(expected, expected[:-1]) == math.inf
    assert probe_difference(expected, (*expected[:-1], math.nan)) == math.inf
    assert probe_difference((), ()) == 0.0


def test_tanh_and_relu_builds_of_the_same_weights_give_different_probes() -> None:
    spec = ModelSpec("net", "credit", FEATURES, "defaulted")
    relu = build_model(spec, input_dim=7, registry={"net": _net(nn.ReLU)})
    tanh = build_model(spec, input_dim=7, registry={"net": _net(nn.Tanh)})
    tanh.load_state_dict(relu.state_dict())
    relu.train()
    ours = probe_logits(relu, 7)
    assert not relu.training  # the probe runs in eval mode
    assert len(ours) == PROBE_ROWS
    assert len(set(ours)) == PROBE_ROWS
    assert probe_difference(ours, probe_logits(tanh, 7)) > 10 * PROBE_TOLERANCE
    with torch.no_grad():
        x = torch.from_numpy(probe_inputs(7))
        assert ours == tuple(float(v) for v in relu(x).reshape(-1))


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_a_node_refuses_a_round_its_build_computes_differently(
    table: Table, activation: type[nn.Module]
) -> None:
    # The node's operator registered "net" with Tanh. A coordinator whose "net" uses the
    # same activation passes; one with ReLU (same names and shapes) is refused before the
    # charge. ReLU's Linear/ReLU stack is the node's batched fast path when built there.
    node_registry = {**MODEL_REGISTRY, "net": _net(nn.Tanh)}
    coordinator_registry = {**MODEL_REGISTRY, "net": _net(activation)}
    plan = _plan(node_registry)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=0, registry=node_registry)
    coordinator_model = build_model(
        plan.spec, input_dim=plan.input_dim, registry=coordinator_registry
    )
    coordinator_model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    expected = probe_logits(coordinator_model, plan.input_dim)
    engine = TrainingEngine(table, registry=node_registry)
    before = {k: v.copy() for k, v in weights.items()}
    if activation is nn.Tanh:
        engine.preflight(plan, weights, probe_logits=expected)
    else:
        with pytest.raises(InvalidRequestError, match="computes another function") as info:
            engine.preflight(plan, weights, probe_logits=expected)
        assert "nothing was charged" in str(info.value)
    for name, array in before.items():  # the probe wrote nothing
        np.testing.assert_array_equal(weights[name], array)


def test_a_node_checks_the_probe_of_a_plain_stack_too(table: Table) -> None:
    # A Linear/ReLU stack skips the made-up-rows pass (the node's batched fast path);
    # with a probe it is still checked: here the node's is ReLU, the coordinator's Tanh.
    node_registry = {**MODEL_REGISTRY, "net": _net(nn.ReLU)}
    plan = _plan(node_registry)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=0, registry=node_registry)
    with torch.device("meta"):
        skeleton = build_model(plan.spec, input_dim=plan.input_dim, registry=node_registry)
    assert _linear_stack(skeleton) is not None
    coordinator_model = build_model(
        plan.spec, input_dim=plan.input_dim, registry={"net": _net(nn.Tanh)}
    )
    coordinator_model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    expected = probe_logits(coordinator_model, plan.input_dim)
    engine = TrainingEngine(table, registry=node_registry)
    engine.preflight(plan, weights)  # no probe: nothing to compare
    with pytest.raises(InvalidRequestError, match="computes another function"):
        engine.preflight(plan, weights, probe_logits=expected)


class _Scribbler(nn.Module):
    """An operator forward that writes its own weight and buffer on every call."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.weight.mul_(2.0)
            self.calls.add_(1.0)
        return self.linear(x)


def test_the_probe_and_the_made_up_rows_never_write_the_received_weights(table: Table) -> None:
    registry = {**MODEL_REGISTRY, "net": lambda spec, dim: _Scribbler(dim)}
    plan = _plan(registry)
    weights = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=0, registry=registry)
    before = {k: v.copy() for k, v in weights.items()}
    model = build_model(plan.spec, input_dim=plan.input_dim, registry=registry)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    expected = probe_logits(model, plan.input_dim)
    assert float(model.calls) == 0.0  # the probe ran on copies
    engine = TrainingEngine(table, registry=registry)
    # Refused (it writes while taking gradients), and the round's weights are as received.
    with pytest.raises(InvalidRequestError, match="nothing was charged"):
        engine.preflight(plan, weights, probe_logits=expected)
    for name, array in before.items():
        np.testing.assert_array_equal(weights[name], array)


def test_a_forward_finite_on_records_is_finite_on_the_probe() -> None:
    class Root(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.linear = nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.sqrt())

    assert all(math.isfinite(v) for v in probe_logits(Root(7), 7))


def test_a_train_config_refuses_a_malformed_probe() -> None:
    base = TrainConfig(
        spec=ModelSpec("net", "credit", FEATURES, "defaulted"),
        round=0,
        total_rounds=1,
        target_epsilon=1.0,
        delta=1e-6,
        sample_rate=0.1,
        local_steps=1,
        learning_rate=0.1,
        clip_norm=1.0,
        job_id="j",
    )
    assert dataclasses.replace(base, probe_logits=(0.0,) * PROBE_ROWS).probe_logits
    for bad in ((0.0,) * (PROBE_ROWS - 1), (math.nan,) * PROBE_ROWS):
        with pytest.raises(InvalidRequestError, match="probe_logits"):
            dataclasses.replace(base, probe_logits=bad)


def _job(builder: ModelBuilder) -> _Job:
    spec = ModelSpec("net", "credit", FEATURES, "defaulted")
    registry = {**MODEL_REGISTRY, "net": builder}
    weights = initial_arrays(spec, input_dim=7, seed=0, registry=registry)
    return _Job(
        spec=spec,
        dim=7,
        names=["hong-kong"],
        rounds=1,
        config={},
        job_id="j",
        min_nodes=1,
        round_timeout_s=60.0,
        optimizer=ServerOptimizer("fedavg", {n: a.shape for n, a in weights.items()}, lr=1.0),
        weights=weights,
        probe_registry=registry,
    )


def test_the_coordinator_probes_a_copy_of_the_weights_with_its_own_builder() -> None:
    job = _job(_net(nn.Tanh))
    before = {k: v.copy() for k, v in job.weights.items()}
    logits = _probe(job)
    model = build_model(job.spec, input_dim=7, registry={"net": _net(nn.Tanh)})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
    assert logits == probe_logits(model, 7)
    assert _probe(dataclasses.replace(job, probe_registry=None)) == ()
    # Built-in architectures are not probed (same code at both ends; a copy and a forward
    # of a 100M-parameter model each round otherwise); an operator's is.
    assert _probe_registry(ModelSpec("mlp", "credit", FEATURES, "defaulted"), {}) is None
    assert _probe_registry(job.spec, {"net": _net(nn.Tanh)}) is not None

    class Writes(nn.Module):  # an operator forward that writes its parameter
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.linear = nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.linear.weight.data.fill_(5.0)
            return self.linear(x)

    writer = _job(lambda spec, dim: Writes(dim))
    kept = {k: v.copy() for k, v in writer.weights.items()}
    _probe(writer)
    for name, array in kept.items():  # the global weights are untouched
        np.testing.assert_array_equal(writer.weights[name], array)


def test_a_round_whose_outputs_overflow_goes_unprobed_not_refused() -> None:
    job = _job(_net(nn.Tanh))
    job.weights["2.weight"][...] = np.float32(3e38)
    job.weights["2.bias"][...] = np.float32(3e38)
    assert _probe(job) == ()


def test_the_coordinator_refuses_a_builder_without_one_logit_per_row() -> None:
    two = _job(lambda spec, dim: nn.Linear(dim, 2))
    with pytest.raises(InvalidRequestError, match="one logit per row"):
        _probe(two)


def test_a_plain_stacks_probe_never_writes_the_received_weights(table: Table) -> None:
    # The stack is checked plain on a skeleton; operator code may install a global hook
    # afterwards (here: the builder's second call), which the probe's forward would run.
    calls: list[int] = [0, 0, 0]  # disarmed while the plan and the weights are made
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def bump(module: nn.Module, args: object, out: object) -> None:
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.add_(1.0)

    def builder(spec: ModelSpec, dim: int) -> nn.Module:
        calls.append(dim)
        if len(calls) == 2:  # preflight's second build, after the skeleton was checked
            handles.append(nn.modules.module.register_module_forward_hook(bump))
        return nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, 1))

    registry = {**MODEL_REGISTRY, "net": builder}
    plan = _plan(registry)
    # Writable C-contiguous buffers, as the node receives them: the model adopts them.
    made = initial_arrays(plan.spec, input_dim=plan.input_dim, seed=0, registry=registry)
    weights = {k: np.array(v, copy=True) for k, v in made.items()}
    before = {k: v.copy() for k, v in weights.items()}
    calls.clear()
    assert not handles  # armed only now
    try:
        with pytest.raises(InvalidRequestError, match="computes another function"):
            TrainingEngine(table, registry=registry).preflight(
                plan, weights, probe_logits=(0.0,) * PROBE_ROWS
            )
    finally:
        for handle in handles:
            handle.remove()
    assert handles  # the hook was installed before the probe ran
    for name, array in before.items():
        np.testing.assert_array_equal(weights[name], array)
