"""Streaming safetensors and training checkpoints (federation.coordinator._checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from federation.coordinator._checkpoint import (
    check_output_file,
    load_checkpoint,
    prepare_checkpoint_dir,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
)
from federation.errors import ConfigError, InvalidRequestError


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "0.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "0.bias": rng.standard_normal(5).astype(np.float32),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_written_files_load_in_plain_torch_and_numpy(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, _arrays(), metadata={"format": "federation-model"})
    as_torch = safetensors.torch.load_file(path)
    as_numpy = safetensors.numpy.load_file(path)
    for name, array in _arrays().items():
        assert torch.equal(as_torch[name], torch.from_numpy(array))
        assert as_numpy[name].tobytes() == array.tobytes()
    assert read_safetensors(path).keys() == _arrays().keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_round_trips_and_keeps_only_the_latest_tensors(tmp_path: Path) -> None:
    state = {"m/0.bias": np.ones(5, np.float32), "v/0.bias": np.full(5, 2.0, np.float32)}
    for round_index in range(3):
        save_checkpoint(
            tmp_path,
            round_index=round_index,
            weights=_arrays(),
            optimizer_state=state,
            document={"job_id": "j", "history": [round_index]},
        )
    body, weights, loaded_state = load_checkpoint(tmp_path)
    assert body["round"] == 2
    assert body["history"] == [2]
    assert [p.name for p in tmp_path.glob("round-*")] == ["round-00002.safetensors"]
    assert weights.keys() == _arrays().keys()
    assert {k: v.tolist() for k, v in loaded_state.items()} == {
        k: v.tolist() for k, v in state.items()
    }


def test_missing_or_foreign_checkpoints_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a federation training checkpoint"):
        load_checkpoint(tmp_path)


def test_output_paths_are_checked_before_a_job_spends_anything(tmp_path: Path) -> None:
    check_output_file(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    with pytest.raises(InvalidRequestError, match="is a directory"):
        check_output_file(tmp_path)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        check_output_file(tmp_path / "missing" / "model.safetensors")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(InvalidRequestError, match="cannot create it"):
        prepare_checkpoint_dir(a_file / "ckpt", resume=False)
    with pytest.raises(InvalidRequestError, match="cannot create it"):
        prepare_checkpoint_dir(a_file, resume=False)


def test_a_checkpoint_is_resumed_or_refused_never_overwritten(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "ckpt"
    prepare_checkpoint_dir(directory, resume=False)  # created, writable
    assert list(directory.iterdir()) == []
    arrays = {"w": np.ones(3, np.float32)}
    save_checkpoint(
        directory, round_index=0, weights=arrays, optimizer_state={}, document={"job_id": "j"}
    )
    with pytest.raises(InvalidRequestError, match="already holds a training checkpoint"):
        prepare_checkpoint_dir(directory, resume=False)
    prepare_checkpoint_dir(directory, resume=True)
    missing = tmp_path / "never"
    prepare_checkpoint_dir(missing, resume=True)  # loading it will say there is none
    assert not missing.exists()


def test_a_scalar_tensor_keeps_its_shape_through_a_checkpoint(tmp_path: Path) -> None:
    # BatchNorm's num_batches_tracked is 0-d: made 1-d, the nodes would refuse the resumed
    # job's weights.
    weights = {"w": np.ones((2, 3), np.float32), "n": np.array(4.0, dtype=np.float32)}
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, weights)
    loaded = read_safetensors(path)
    assert loaded["n"].shape == ()
    assert loaded["w"].shape == (2, 3)
    np.testing.assert_array_equal(loaded["n"], weights["n"])
