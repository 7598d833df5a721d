"""Operator-registered architectures: the node config's ``[architectures]``, the loader,
and the node's refusal of what it cannot build (federation.architectures, nodes.server)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from federation.architectures import EXTENDED_REGISTRY, load_builder, registry_with
from federation.errors import ConfigError, InvalidRequestError
from federation.models import ModelSpec, build_model
from nodes.config import NodeConfig, parse_config
from nodes.server import _registry

BUILDER = """
from torch import nn

def tanh_net(spec, input_dim):
    return nn.Sequential(nn.Linear(input_dim, 8), nn.Tanh(), nn.Linear(8, 1))

NOT_A_FUNCTION = 3
"""

NODE = """\
[node]
name = "hong-kong"
listen = "127.0.0.1:0"

[[datasets]]
name = "credit"
source = "data.csv"

  [[datasets.columns]]
  name = "age"
  type = "int"
  lower = 18
  upper = 90

[consumers.acme-ai]
epsilon = 10.0
operations = ["describe", "train"]
allowed_models = {allowed}

[architectures]
{architectures}
"""


def _config(tmp_path: Path, architectures: str, allowed: str = '["mlp", "tanh-net"]') -> NodeConfig:
    text = NODE.format(architectures=architectures, allowed=allowed)
    (tmp_path / "data.csv").write_text("age\n30\n")
    return parse_config(tomllib.loads(text), base_dir=tmp_path)


@pytest.fixture
def builder_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "operator_nets.py"
    path.parent.mkdir()
    path.write_text(BUILDER)
    return path


def test_a_registered_architecture_builds_next_to_the_built_ins(
    tmp_path: Path, builder_file: Path
) -> None:
    # A relative file path is taken from the config's folder, as every path there is.
    config = _config(tmp_path, 'tanh-net = "models/operator_nets.py:tanh_net"')
    assert config.architectures == {"tanh-net": f"{builder_file}:tanh_net"}
    registry = _registry(config)
    assert set(registry) == {*EXTENDED_REGISTRY, "tanh-net"}
    model = build_model(
        ModelSpec("tanh-net", "credit", ("age",), "y"), input_dim=3, registry=registry
    )
    assert any(isinstance(m, nn.Tanh) for m in model.modules())
    assert model(torch.zeros(2, 3)).shape == (2, 1)


def test_a_module_target_imports_by_name() -> None:
    assert load_builder("federation.architectures:_wide_mlp") is EXTENDED_REGISTRY["wide-mlp"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("operator_nets.py", "is not 'package.module:function' or 'file.py:function'"),
        ("models/operator_nets.py:missing", "'missing' is not a function"),
        ("models/operator_nets.py:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not a function"),
        ("models/absent.py:f", "does not import: FileNotFoundError"),
        ("no_such_package_here:f", "does not import: ModuleNotFoundError"),
        ("not a module:f", "is neither a module name nor a .py file"),
    ],
)
def test_a_bad_target_is_a_config_error_naming_it(
    tmp_path: Path, builder_file: Path, target: str, message: str
) -> None:
    del builder_file
    with pytest.raises(ConfigError, match=message):
        load_builder(target, base_dir=tmp_path)


def test_the_node_refuses_to_start_on_an_architecture_it_cannot_load(tmp_path: Path) -> None:
    config = _config(tmp_path, 'tanh-net = "models/absent.py:tanh_net"')
    with pytest.raises(ConfigError, match=r"^architectures\.tanh-net: .*does not import"):
        _registry(config)


def test_allowed_models_must_name_an_architecture_the_node_builds(
    tmp_path: Path, builder_file: Path
) -> None:
    del builder_file
    config = _config(tmp_path, 'tanh-net = "models/operator_nets.py:tanh_net"', '["tanh-nett"]')
    with pytest.raises(
        ConfigError,
        match=r"consumers\.acme-ai\.allowed_models: 'tanh-nett' is not an architecture this "
        r"node builds \(did you mean 'tanh-net'\?\); it builds: logistic, mlp, wide-mlp, tanh-net",
    ):
        _registry(config)


def test_a_built_in_name_cannot_be_redefined(tmp_path: Path, builder_file: Path) -> None:
    # What "mlp" builds must be the same at every node and at the coordinator.
    del builder_file
    config = _config(tmp_path, 'mlp = "models/operator_nets.py:tanh_net"', '["mlp"]')
    with pytest.raises(ConfigError, match="architecture 'mlp' is built in"):
        _registry(config)
    with pytest.raises(InvalidRequestError, match="is built in"):
        registry_with({"logistic": EXTENDED_REGISTRY["mlp"]})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('"bad name!" = "m.py:f"', r"architectures\.\"bad name!\": an architecture name"),
        ('tanh-net = "m.py"', "expected 'package.module:function' or 'file.py:function'"),
        ("tanh-net = 3", "expected 'package.module:function' or 'file.py:function'"),
    ],
)
def test_the_config_refuses_a_malformed_entry(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, line)


def test_the_train_command_reads_architecture_options(
    tmp_path: Path, builder_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from federation._train_cli import _architectures

    monkeypatch.chdir(tmp_path)  # a relative file is taken from where the command runs
    builders = _architectures(["tanh-net=models/operator_nets.py:tanh_net"])
    assert list(builders) == ["tanh-net"]
    assert isinstance(builders["tanh-net"](ModelSpec("t", "d", ("a",), "y"), 2), nn.Sequential)
    with pytest.raises(InvalidRequestError, match="expected NAME=package.module:function"):
        _architectures(["models/operator_nets.py:tanh_net"])
    with pytest.raises(ConfigError, match="--architecture tanh-net: .*'nope' is not a function"):
        _architectures(["tanh-net=models/operator_nets.py:nope"])
    del builder_file


def test_a_builder_that_refuses_a_spec_is_an_invalid_argument_not_an_internal_error() -> None:
    # The node plans every round with build_model before any charge: an operator's builder
    # that raises on hyper-parameters it does not support must read as a bad request.
    def strict(spec: ModelSpec, dim: int) -> nn.Module:
        if spec.hidden:
            raise ValueError("tanh-net takes no hidden widths")
        return nn.Linear(dim, 1)

    def broken(spec: ModelSpec, dim: int) -> nn.Module:
        return None  # type: ignore[return-value]

    registry = registry_with({"strict": strict, "broken": broken})
    with pytest.raises(
        InvalidRequestError,
        match=r"'strict' cannot be built with hidden \[8\] and 3 inputs: ValueError: tanh-net",
    ):
        build_model(
            ModelSpec("strict", "d", ("a",), "y", hidden=(8,)), input_dim=3, registry=registry
        )
    with pytest.raises(InvalidRequestError, match="built a NoneType, not a torch.nn.Module"):
        build_model(ModelSpec("broken", "d", ("a",), "y"), input_dim=3, registry=registry)


def test_a_builder_that_cannot_be_called_with_spec_and_input_dim_stops_the_node(
    tmp_path: Path,
) -> None:
    (tmp_path / "nets.py").write_text("def net(spec):\n    return None\n")
    with pytest.raises(
        ConfigError, match=r"net\(spec\) cannot be called as net\(spec, input_dim\)"
    ):
        load_builder("nets.py:net", base_dir=tmp_path)


def test_a_file_builder_may_define_dataclasses(tmp_path: Path) -> None:
    # dataclasses look their module up in sys.modules while the class is made.
    (tmp_path / "nets.py").write_text(
        "import dataclasses\nfrom torch import nn\n\n"
        "@dataclasses.dataclass\nclass Widths:\n    hidden: int = 4\n\n"
        "def net(spec, input_dim):\n    return nn.Linear(input_dim, Widths().hidden)\n"
    )
    builder = load_builder("nets.py:net", base_dir=tmp_path)
    assert isinstance(builder(ModelSpec("n", "d", ("a",), "y"), 3), nn.Linear)


def test_the_train_command_reads_its_evaluate_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from federation._train_cli import _evaluator

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "def evaluate(model):\n    return {'n': 1.0}\n\ndef two(model, data):\n    return {}\n"
    )
    assert _evaluator(None) is None
    evaluate = _evaluator("mine.py:evaluate")
    assert evaluate is not None
    assert evaluate(nn.Linear(1, 1)) == {"n": 1.0}
    with pytest.raises(ConfigError, match=r"--evaluate: .*two\(model, data\) cannot be called"):
        _evaluator("mine.py:two")
