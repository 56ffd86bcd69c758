"""Evaluation metrics, each defined in its docstring (the report quotes these definitions).

Distribution metrics compare a predicted cell set ``pred (n, D)`` with the observed perturbed set
``obs (m, D)``; shift metrics compare mean profiles relative to the control set ``ctrl (k, D)``.
"""

from __future__ import annotations

import re
from itertools import pairwise

import numpy as np
import pandas as pd
import torch

from mhc_kernels.metrics import loss_spikes

DEFINITIONS = {
    "energy_distance": "Energy distance between predicted and observed cell sets, "
    "E|x-y| - E|x-x'|/2 - E|y-y'|/2 (Euclidean; 0 for identical distributions). Lower is better.",
    "nn_distance_norm": "Mean distance from each predicted cell to its nearest observed perturbed "
    "cell, divided by the same quantity for the observed cells themselves (nearest *other* observed "
    "cell). About 1 when predictions sit among the observed cells. Lower is better.",
    "pearson_delta": "Pearson correlation over features between the predicted and the observed "
    'shift of the mean profile from the control mean ("gene correlation" when features are '
    "genes). 1 is perfect; undefined (NaN) for a prediction with no shift. Higher is better.",
    "mae_mean": "Mean absolute error between the predicted and observed mean profiles. Lower is "
    "better.",
    "discrimination": "1 - r/(G-1), where r is the number of other groups whose observed mean "
    "profile is closer (L1) to the predicted mean than the group's own observed mean, among G "
    "groups of the split. 1: the prediction is closest to its own group; 0.5: chance. Higher is "
    "better.",
    "temporal_coherence": "Per cell type: Pearson correlation between predicted and observed "
    "day-to-day changes of the shift from control (shift at day t+1 minus shift at day t, all "
    "consecutive pairs concatenated). Higher is better.",
}
LOWER_IS_BETTER = {"energy_distance", "nn_distance_norm", "mae_mean"}


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # exact differences, not the |a|^2 + |b|^2 - 2ab shortcut (which leaves ~1e-8 for a == b)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def energy_distance(pred, obs) -> float:
    """Energy distance (see DEFINITIONS); V-statistics, so identical sets score exactly 0."""
    x, y = _t(pred), _t(obs)
    xy = _cdist(x, y).mean()
    xx = _cdist(x, x).mean()
    yy = _cdist(y, y).mean()
    return float(xy - 0.5 * xx - 0.5 * yy)


def nn_distance_norm(pred, obs) -> float:
    """Normalised nearest-neighbour distance (see DEFINITIONS)."""
    x, y = _t(pred), _t(obs)
    to_obs = _cdist(x, y).min(dim=1).values.mean()
    within = _cdist(y, y)
    within.fill_diagonal_(float("inf"))
    own = within.min(dim=1).values.mean() if len(y) > 1 else torch.tensor(float("nan"))
    return float(to_obs / own)


def pearson_delta(pred, obs, ctrl) -> float:
    """Correlation of predicted vs observed mean shift from control (see DEFINITIONS)."""
    base = np.asarray(ctrl).mean(0)
    a = np.asarray(pred).mean(0) - base
    b = np.asarray(obs).mean(0) - base
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def mae_mean(pred, obs) -> float:
    """MAE of the mean profile (see DEFINITIONS)."""
    return float(np.abs(np.asarray(pred).mean(0) - np.asarray(obs).mean(0)).mean())


def discrimination(pred_means: np.ndarray, obs_means: np.ndarray) -> np.ndarray:
    """Per-group discrimination score (see DEFINITIONS); rows of both arrays are groups."""
    groups = len(obs_means)
    if groups < 2:
        return np.full(groups, np.nan)
    dist = np.abs(pred_means[:, None, :] - obs_means[None, :, :]).sum(-1)  # (pred g, obs g')
    own = np.diag(dist)
    closer = (dist < own[:, None]).sum(1)
    return 1 - closer / (groups - 1)


def temporal_coherence(pred_shift: dict, obs_shift: dict) -> float:
    """Correlation of day-to-day shift changes; ``*_shift`` map timepoint -> shift vector."""
    days = sorted(set(pred_shift) & set(obs_shift), key=timepoint_key)
    if len(days) < 2:
        return float("nan")
    dp = np.concatenate([pred_shift[b] - pred_shift[a] for a, b in pairwise(days)])
    do = np.concatenate([obs_shift[b] - obs_shift[a] for a, b in pairwise(days)])
    if dp.std() == 0 or do.std() == 0:
        return float("nan")
    return float(np.corrcoef(dp, do)[0, 1])


def day_of(timepoint: str) -> float | None:
    """The number in a timepoint label (``"19"``, ``"D19"``, ``"day 19"``, ``"E14.5"``), or None."""
    match = re.search(r"\d+(?:\.\d+)?", str(timepoint))
    return float(match.group()) if match else None


def timepoint_key(timepoint: str) -> tuple:
    """Sort key of timepoint labels: by their number where they have one (``"D7"`` before
    ``"D14"``, which sort the other way as text), the others after them by name."""
    day = day_of(timepoint)
    return (0, day, str(timepoint)) if day is not None else (1, 0.0, str(timepoint))


# ------------------------------------------------------------------------- training stability

STABILITY_DEFINITIONS = {
    "loss_spikes": "Steps whose training loss exceeds 1.5x the running median of the previous 20 "
    "steps.",
    "grad_norm_median": "Median global gradient norm (before clipping).",
    "grad_norm_p99": "99th percentile of the gradient norm.",
    "grad_norm_max": "Largest gradient norm.",
    "grad_norm_cv": "Coefficient of variation of the gradient norm (std / mean).",
    "clipped_fraction": "Fraction of steps whose gradient norm exceeded the clipping threshold.",
}


def training_stability(metrics: pd.DataFrame, window: int = 20, factor: float = 1.5) -> dict:
    """Stability statistics of a run's ``metrics.csv`` (see STABILITY_DEFINITIONS)."""
    train = metrics[metrics["split"] == "train"]
    spikes = loss_spikes(train["loss"].astype(float).to_numpy(), window, factor)
    norm = train["grad_norm"].astype(float).dropna().to_numpy()
    if not len(norm):
        norm = np.array([np.nan])
    return {
        "loss_spikes": spikes,
        "grad_norm_median": float(np.median(norm)),
        "grad_norm_p99": float(np.percentile(norm, 99)),
        "grad_norm_max": float(np.max(norm)),
        "grad_norm_cv": float(np.std(norm) / np.mean(norm)) if np.mean(norm) else float("nan"),
        "clipped_fraction": float(pd.to_numeric(train["clipped"], errors="coerce").mean()),
    }
