"""federation.metrics: the coordinator's own evaluation of a model on its own data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from federation.errors import InvalidRequestError
from federation.metrics import evaluator, roc_auc


def test_the_evaluator_gives_auc_loss_and_accuracy_of_the_models_logits() -> None:
    x = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    y = np.array([False, True, False, True])
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-1.5)  # logits -1.5, -0.5, 0.5, 1.5
    values = evaluator(x, y)(model)
    logits = np.array([-1.5, -0.5, 0.5, 1.5])
    assert values["auc"] == roc_auc(logits, y) == 0.75
    assert values["accuracy"] == 0.5  # predicts 0, 0, 1, 1 against 0, 1, 0, 1
    expected_loss = np.mean(np.logaddexp(0.0, logits) - y * logits)
    assert values["loss"] == pytest.approx(expected_loss, rel=1e-12)


def test_the_evaluator_refuses_data_it_cannot_score() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(InvalidRequestError, match="both classes"):
        evaluator(x, np.array([True, True, True]))
    with pytest.raises(InvalidRequestError, match="one label per record"):
        evaluator(x, np.array([True, False]))


def test_the_evaluator_checks_labels_and_inputs_when_made_not_in_the_job() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(InvalidRequestError, match="bool or 0/1"):
        evaluator(x, np.array(["false", "true", "true"]))
    with pytest.raises(InvalidRequestError, match="bool or 0/1"):
        evaluator(x, np.array([1, 2, 1]))
    with pytest.raises(InvalidRequestError, match="y 1-D"):
        evaluator(x, np.array([[0], [1], [1]]))
    with pytest.raises(InvalidRequestError, match="NaN or infinite"):
        evaluator(np.full((3, 2), np.nan, dtype=np.float32), np.array([0, 1, 1]))
    evaluator(x, np.array([0, 1, 1]))  # 0/1 integers are labels


def test_a_diverged_model_scores_nan_not_a_plausible_auc() -> None:
    x = np.zeros((4, 1), dtype=np.float32)
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    values = evaluator(x, np.array([False, True, False, True]))(model)
    assert all(np.isnan(v) for v in values.values())
    # And the history writes it as JSON's null, not a bare NaN.
    from federation.coordinator._history import RoundRecord

    record = RoundRecord(0, (), (), (), (), 1.0, evaluation=tuple(values.items()))
    assert record.to_dict()["evaluation"] == {"auc": None, "loss": None, "accuracy": None}
    assert np.isnan(dict(RoundRecord.from_dict(record.to_dict()).evaluation)["auc"])


def test_scores_come_batch_by_batch_and_equal_one_pass() -> None:
    from federation.metrics import predict

    x = np.random.default_rng(0).random((1000, 4)).astype(np.float32)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        whole = model(torch.from_numpy(x)).reshape(-1).double().numpy()
    np.testing.assert_array_equal(predict(model, x, batch=64), whole)
