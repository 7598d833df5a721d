"""Streaming safetensors and training checkpoints (federation.coordinator._checkpoint)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from federation.coordinator._checkpoint import (
    CHECKPOINT_FILE,
    check_output_file,
    load_checkpoint,
    prepare_checkpoint_dir,
    read_safetensors,
    save_checkpoint,
    write_safetensors,
)
from federation.coordinator.training import _check_unchanged, _encoding_changes
from federation.datasets import CREDIT_SCHEMA
from federation.errors import ConfigError, InvalidRequestError
from federation.models import ModelSpec
from federation.schema import Column, ColumnType


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


def test_a_job_refuses_a_checkpoint_another_job_wrote_after_it_was_read(tmp_path: Path) -> None:
    # Read (resume) happens before the directory's lock is taken: a job that finished or
    # died in between may have moved the checkpoint on. Checked under the lock, before
    # any round: running the old rounds again would charge them again.
    job = SimpleNamespace(job_id="job-a")
    _check_unchanged(tmp_path, job, 0)  # a new job, nothing there: fine
    (tmp_path / CHECKPOINT_FILE).write_text(json.dumps({"job_id": "job-a", "round": 1}))
    _check_unchanged(tmp_path, job, 2)  # resumed after round 2 (index 1), as read
    with pytest.raises(InvalidRequestError, match="now at round 2 of job job-a"):
        _check_unchanged(tmp_path, job, 1)  # read when it held round 1 only
    with pytest.raises(InvalidRequestError, match="changed after this job read it"):
        _check_unchanged(tmp_path, SimpleNamespace(job_id="job-b"), 0)  # another job's now


def test_resume_compares_exactly_the_columns_the_job_encodes() -> None:
    spec = ModelSpec("mlp", "credit", ("income", "housing"), "defaulted", (4,))
    before = CREDIT_SCHEMA
    columns = {c.name: c for c in before.columns}
    assert _encoding_changes(before, before, spec) == []
    # A bound moved by 0.4 moves every scaled input (a "%g" comparison would miss it).
    income = columns["income"]
    assert income.upper is not None
    nudged = dataclasses.replace(income, upper=income.upper + 0.4)
    now = dataclasses.replace(
        before, columns=tuple(nudged if c.name == "income" else c for c in before.columns)
    )
    (line,) = _encoding_changes(before, now, spec)
    assert line.startswith("column 'income':")
    # A column the job does not use may change (or appear) without stopping it.
    extra = Column("branch", ColumnType.CATEGORY, domain=("a", "b"))
    wider = dataclasses.replace(before, columns=(*before.columns, extra))
    assert _encoding_changes(before, wider, spec) == []
