"""Run health verdicts from a run's history: stayed at chance, constant prediction, non-finite loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.training.health import assess, chance_threshold


def test_chance_threshold_is_three_binomial_sigmas_above_one_over_c():
    # 10 classes, 250 validation samples: 0.1 + 3 * sqrt(0.09 / 250) = 0.1569...
    assert chance_threshold(10, 250) == pytest.approx(0.1 + 3 * math.sqrt(0.09 / 250))
    assert chance_threshold(10, 250) == pytest.approx(0.156921, abs=1e-6)


def _confusion(predicted_share: float, n: int = 100) -> np.ndarray:
    """10-class confusion where `predicted_share` of all predictions are class 0, the rest spread evenly."""
    confusion = np.zeros((10, 10), dtype=np.int64)
    on_zero = int(round(predicted_share * n))
    confusion[:, 0] = on_zero // 10
    rest = n - confusion[:, 0].sum()
    for i in range(rest):
        confusion[i % 10, 1 + i % 9] += 1
    return confusion


def test_a_run_that_left_chance_is_healthy_and_reports_when():
    health = assess([0.1, 0.12, 0.2, 0.5], _confusion(0.1), False, 10, 250)
    assert health.healthy and health.left_plateau_epoch == 2
    assert health.as_dict()["verdict"] == "healthy"


def test_a_run_that_never_left_chance_is_flagged():
    health = assess([0.1, 0.116, 0.12, 0.15], _confusion(0.1), False, 10, 250)
    assert health.problems == ["stayed_at_chance"] and health.left_plateau_epoch is None
    assert health.as_dict()["verdict"] == "flagged"


def test_constant_prediction_and_non_finite_loss_are_flagged():
    health = assess([0.1, 0.5], _confusion(0.95), True, 10, 250)
    assert health.problems == ["constant_prediction", "non_finite_loss"]
    assert assess([0.1, 0.5], _confusion(0.85), False, 10, 250).healthy


def test_a_network_without_accuracy_or_test_is_judged_on_its_loss_only():
    assert assess(None, None, False, 10, 250).healthy
    assert assess(None, None, True, 10, 250).problems == ["non_finite_loss"]
