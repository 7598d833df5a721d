"""Tests for federation.models: declarative specs, builders and the weight checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from federation.datasets import CREDIT_SCHEMA
from federation.errors import InvalidRequestError
from federation.models import (
    MODEL_REGISTRY,
    ModelBuilder,
    ModelSpec,
    all_finite,
    arrays_to_state,
    build_model,
    initial_arrays,
    input_dim,
    state_shapes,
    state_to_arrays,
    state_views,
)

FEATURES = ("age", "income", "employment", "has_mortgage")


def _spec(architecture: str = "mlp", hidden: tuple[int, ...] = (8, 4)) -> ModelSpec:
    return ModelSpec(architecture, "credit", FEATURES, "defaulted", hidden)


def test_input_dim_one_hots_categories_over_the_public_domain() -> None:
    # age, income, has_mortgage: 1 each; employment: 5 public values.
    assert input_dim(_spec(), CREDIT_SCHEMA) == 3 + 5


def test_input_dim_rejects_an_unknown_feature() -> None:
    spec = ModelSpec("logistic", "credit", ("age", "salary"), "defaulted")
    with pytest.raises(InvalidRequestError, match="salary"):
        input_dim(spec, CREDIT_SCHEMA)


def test_logistic_is_one_linear_layer() -> None:
    model = build_model(_spec("logistic", ()), input_dim=8)
    assert state_shapes(model) == {"weight": (1, 8), "bias": (1,)}


def test_mlp_is_a_linear_relu_stack_ending_in_one_logit() -> None:
    model = build_model(_spec("mlp", (8, 4)), input_dim=8)
    assert isinstance(model, nn.Sequential)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert state_shapes(model) == {
        "0.weight": (8, 8),
        "0.bias": (8,),
        "2.weight": (4, 8),
        "2.bias": (4,),
        "4.weight": (1, 4),
        "4.bias": (1,),
    }
    assert model(torch.zeros(3, 8)).shape == (3, 1)


@pytest.mark.parametrize(
    ("architecture", "hidden", "match"),
    [
        ("resnet", (), "not known"),
        ("mlp", (), "1-8 layer"),
        ("mlp", (0,), "widths must be 1-4096"),
        ("mlp", (4097,), "widths must be 1-4096"),
        ("mlp", (4,) * 9, "1-8 layer"),
        ("logistic", (4,), "must be empty for logistic"),
    ],
)
def test_build_model_rejects_bad_specs(
    architecture: str, hidden: tuple[int, ...], match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        build_model(_spec(architecture, hidden), input_dim=4)


def test_an_operator_registry_adds_architectures_by_name_only() -> None:
    def tiny(spec: ModelSpec, dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, 2), nn.Tanh(), nn.Linear(2, 1))

    registry: dict[str, ModelBuilder] = {**MODEL_REGISTRY, "tiny": tiny}
    model = build_model(_spec("tiny", ()), input_dim=3, registry=registry)
    assert state_shapes(model)["0.weight"] == (2, 3)
    with pytest.raises(InvalidRequestError, match="not known"):
        build_model(_spec("tiny", ()), input_dim=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"architecture": "mlp;rm"}, "architecture"),
        ({"features": ()}, "features must list"),
        ({"features": ("age", "age")}, "twice"),
        ({"target": "age"}, "also a feature"),
        ({"target": ""}, "target"),
        ({"hidden": (4.0,)}, "integers"),
    ],
)
def test_spec_checks_itself(kwargs: dict[str, object], match: str) -> None:
    fields: dict[str, object] = {
        "architecture": "mlp",
        "dataset": "credit",
        "features": ("age", "income"),
        "target": "defaulted",
        "hidden": (4,),
    }
    fields.update(kwargs)
    with pytest.raises(InvalidRequestError, match=match):
        ModelSpec(**fields)  # type: ignore[arg-type]


def test_state_round_trips_as_float32_c_contiguous_copies() -> None:
    model = build_model(_spec(), input_dim=8)
    arrays = state_to_arrays(model)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays.values())
    other = build_model(_spec(), input_dim=8)
    arrays_to_state(other, arrays)
    for name, value in state_to_arrays(other).items():
        np.testing.assert_array_equal(value, arrays[name])
    arrays["0.bias"][:] = 7.0  # a copy: the module is not aliased
    assert not np.any(state_to_arrays(other)["0.bias"] == 7.0)


def test_arrays_to_state_rejects_a_mismatched_shape() -> None:
    model = build_model(_spec(), input_dim=8)
    arrays = state_to_arrays(model)
    arrays["2.weight"] = np.zeros((4, 9), dtype=np.float32)
    with pytest.raises(InvalidRequestError, match=r"'2.weight' must have shape \[4, 8\]"):
        arrays_to_state(model, arrays)


def test_arrays_to_state_rejects_wrong_names() -> None:
    model = build_model(_spec(), input_dim=8)
    arrays = state_to_arrays(model)
    arrays["9.weight"] = arrays.pop("4.weight")
    with pytest.raises(InvalidRequestError, match=r"missing \['4.weight'\]"):
        arrays_to_state(model, arrays)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_arrays_to_state_rejects_non_finite_values(bad: float) -> None:
    model = build_model(_spec(), input_dim=8)
    before = state_to_arrays(model)
    arrays = state_to_arrays(model)
    arrays["0.weight"][3, 2] = bad
    with pytest.raises(InvalidRequestError, match="NaN or infinite"):
        arrays_to_state(model, arrays)
    for name, value in state_to_arrays(model).items():  # nothing was loaded
        np.testing.assert_array_equal(value, before[name])


def test_arrays_to_state_rejects_other_dtypes() -> None:
    model = build_model(_spec(), input_dim=8)
    arrays = {k: v.astype(np.float64) for k, v in state_to_arrays(model).items()}
    with pytest.raises(InvalidRequestError, match="must be float32; got float64"):
        arrays_to_state(model, arrays)


def test_initial_arrays_are_seeded_and_leave_global_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = initial_arrays(_spec(), input_dim=8, seed=5)
    assert torch.rand(1) == expected
    second = initial_arrays(_spec(), input_dim=8, seed=5)
    third = initial_arrays(_spec(), input_dim=8, seed=6)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["0.weight"], third["0.weight"])


def test_arrays_to_state_accepts_read_only_buffers_from_the_wire() -> None:
    model = build_model(_spec(), input_dim=8)
    arrays = {
        name: np.frombuffer(value.tobytes(), dtype="<f4").reshape(value.shape)
        for name, value in state_to_arrays(build_model(_spec(), input_dim=8)).items()
    }
    assert not arrays["0.weight"].flags.writeable
    arrays_to_state(model, arrays)
    for name, value in state_to_arrays(model).items():
        np.testing.assert_array_equal(value, arrays[name])


def test_state_views_share_float32_cpu_storage_and_copy_anything_else() -> None:
    model = nn.Linear(3, 2)
    model.register_buffer("scale", torch.ones(2, dtype=torch.float64))
    model.register_buffer("strided", torch.arange(6.0).reshape(2, 3).T)
    views = state_views(model)
    assert np.shares_memory(views["weight"], model.weight.detach().numpy())
    for name in ("scale", "strided"):  # float64 and non-contiguous: one owned float32 copy
        array = views[name]
        assert array.dtype == np.float32
        assert array.flags.c_contiguous
        assert not np.shares_memory(array, getattr(model, name).numpy())
        np.testing.assert_array_equal(array, getattr(model, name).numpy())


def test_all_finite_checks_every_layout_without_copying_contiguous_ones() -> None:
    base = np.arange(3 * 70_000, dtype=np.float32).reshape(3, 70_000)
    for array in (base, np.asfortranarray(base), base[:, ::2], base.T, np.float32(2.0)):
        assert all_finite(np.asarray(array))
        bad = np.array(array, copy=True)
        bad[np.unravel_index(bad.size - 1, bad.shape)] = np.nan
        assert not all_finite(bad)
    assert all_finite(np.zeros((0, 5), dtype=np.float32))
    flagged = np.asfortranarray(base.copy())
    flagged[2, 69_999] = np.inf  # the last element in C order, not in memory order
    assert not all_finite(flagged)
