"""A model's predictions for a run's held-out cell sets, and their energy distance per group.

Used by training (the pretrained-vs-fine-tuned line of the summary) and by the evaluation. The
predictions run on the GPU when there is one (:func:`evaluation_device`; an ST-Tahoe-sized model
takes seconds per batch on CPU cores), in float32, with the model back where it was afterwards.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import torch

from .data import CellSetData
from .training import set_loss


def evaluation_device(accelerator: str = "auto", strategy: str = "auto") -> torch.device:
    """The GPU when there is one and the run did not ask for the CPU (``trainer.accelerator``) or
    a strategy that forks its processes (``ddp_fork``, ``ddp_notebook``: CUDA must not be
    initialised before they fork)."""
    forks = any(word in str(strategy) for word in ("fork", "notebook"))
    gpu = torch.cuda.is_available() and accelerator != "cpu" and not forks
    return torch.device("cuda" if gpu else "cpu")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode on ``device`` for the block, back on its own device afterwards."""
    home = next(model.parameters()).device
    model.eval().to(device)
    try:
        yield model
    finally:
        model.to(home)


@torch.no_grad()
def predicted_sets(model: torch.nn.Module, data: CellSetData, split: str, batch_size: int,
                   device: torch.device | str) -> Iterator[tuple[dict, torch.Tensor]]:  # fmt: skip
    """``(batch, prediction)`` for each batch of ``split``'s sets: the batch on ``device``, the
    prediction in float32 there, ``(sets, cells, features)``. The model must take sets of the
    data's length (it would split or merge them silently otherwise)."""
    size, expected = model.config.cell_set_len, data.cfg.cell_set_len
    if size != expected:
        raise ValueError(f"the model predicts sets of {size} cells but {split}'s sets have "
                         f"{expected} (data.cell_set_len): set model.config.cell_set_len")  # fmt: skip
    with evaluating(model, device):
        for batch in data.loader(split, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            yield batch, model(batch).float().reshape(len(batch["group"]), -1, data.table.dim)


@torch.no_grad()
def heldout_energy(model: torch.nn.Module, data: CellSetData, split: str = "test",
                   batch_size: int = 16, device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Mean energy distance between predicted and observed cell sets of ``split``.

    Returns ``{"overall": float, "groups": {group name: float}, "sets": int}``; the overall value is
    the mean over groups (each group weighs the same whatever its size). NaN when the split is empty.
    """
    energy = set_loss("energy")
    groups = data.groups[split]
    per_group: dict[str, list[float]] = defaultdict(list)
    for batch, pred in predicted_sets(model, data, split, batch_size, device):
        target = batch["pert_cell_emb"].float().reshape(pred.shape)
        for gi, value in zip(batch["group"].tolist(), energy(pred, target).tolist(), strict=True):
            per_group[groups[gi].name].append(value)
    means = {name: float(np.mean(v)) for name, v in sorted(per_group.items())}
    overall = float(np.mean(list(means.values()))) if means else float("nan")
    return {"overall": overall, "groups": means, "sets": sum(len(v) for v in per_group.values())}
