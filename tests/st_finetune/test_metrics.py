"""Evaluation metrics on hand-made cases with known answers."""

import numpy as np
import pandas as pd
import pytest

from st_finetune import metrics as M

rng = np.random.default_rng(0)
X = rng.normal(size=(50, 5))
CTRL = rng.normal(size=(40, 5))


def test_identical_sets_score_zero_distance_and_unit_correlation():
    assert M.energy_distance(X, X) == pytest.approx(0, abs=1e-12)
    assert M.mae_mean(X, X) == 0
    assert M.pearson_delta(X, X, CTRL) == pytest.approx(1.0)


def test_energy_distance_grows_with_a_shift_and_is_symmetric():
    near, far = X + 0.1, X + 2.0
    assert 0 < M.energy_distance(near, X) < M.energy_distance(far, X)
    assert M.energy_distance(far, X) == pytest.approx(M.energy_distance(X, far))


def test_energy_distance_of_point_masses_is_their_distance():
    a, b = np.zeros((3, 2)), np.tile([3.0, 4.0], (4, 1))
    assert M.energy_distance(a, b) == pytest.approx(5.0)


def test_no_change_prediction_scores_as_it_should():
    obs = CTRL + np.array([1.0, -1.0, 0.5, 0.0, 2.0])
    assert np.isnan(M.pearson_delta(CTRL, obs, CTRL))  # a prediction without shift: undefined
    assert M.mae_mean(CTRL, obs) == pytest.approx(np.abs([1.0, -1.0, 0.5, 0.0, 2.0]).mean())


def test_nn_distance_is_zero_on_the_observed_cells_and_above_one_when_off():
    assert M.nn_distance_norm(X, X) == 0  # every predicted cell sits on an observed one
    assert M.nn_distance_norm(X + 5, X) > 1


def test_discrimination_perfect_and_worst():
    obs = np.eye(4) * 10
    assert (M.discrimination(obs, obs) == 1).all()
    swapped = obs[[1, 0, 3, 2]]
    assert (M.discrimination(swapped, obs) == 1 - 1 / 3).all()


def test_temporal_coherence():
    obs = {"10": np.zeros(3), "14": np.array([1.0, 2, 3]), "19": np.array([0.0, 1, 1])}
    assert M.temporal_coherence(obs, obs) == pytest.approx(1.0)
    flipped = {k: -v for k, v in obs.items()}
    assert M.temporal_coherence(flipped, obs) == pytest.approx(-1.0)
    assert np.isnan(M.temporal_coherence({"10": np.ones(3)}, obs))


def test_timepoints_are_ordered_by_their_number():
    assert sorted(["D14", "baseline", "D7", "day 21", "E3.5"], key=M.timepoint_key) == [
        "E3.5", "D7", "D14", "day 21", "baseline"]  # fmt: skip
    rng = np.random.default_rng(0)
    obs, pred = ({day: rng.normal(size=5) for day in (7, 14, 21)} for _ in range(2))
    numbers = M.temporal_coherence({str(d): v for d, v in pred.items()},
                                   {str(d): v for d, v in obs.items()})  # fmt: skip
    labels = M.temporal_coherence({f"D{d}": v for d, v in pred.items()},
                                  {f"D{d}": v for d, v in obs.items()})  # fmt: skip
    assert labels == pytest.approx(numbers)  # "D14" < "D21" < "D7" as text


def test_training_stability_counts_spikes_and_clipping():
    loss = [1.0] * 30 + [3.0] + [1.0] * 9
    norm = [0.5] * 39 + [4.0]
    frame = pd.DataFrame({"split": "train", "loss": loss, "grad_norm": norm,
                          "clipped": [0] * 39 + [1]})  # fmt: skip
    stats = M.training_stability(frame)
    assert stats["loss_spikes"] == 1
    assert stats["grad_norm_max"] == 4.0 and stats["grad_norm_median"] == 0.5
    assert stats["clipped_fraction"] == pytest.approx(1 / 40)
