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
