"""Held-out energy distance of a model on a run's split, per group and overall.

Used by training (the pretrained-vs-fine-tuned line of the summary) and by the evaluation.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .data import CellSetData
from .training import set_loss


@torch.no_grad()
def heldout_energy(model: torch.nn.Module, data: CellSetData, split: str = "test",
                   batch_size: int = 16) -> dict:  # fmt: skip
    """Mean energy distance between predicted and observed cell sets of ``split``.

    Returns ``{"overall": float, "groups": {group name: float}, "sets": int}``; the overall value is
    the mean over groups (each group weighs the same whatever its size). NaN when the split is empty.
    """
    model.eval()
    energy = set_loss("energy")
    groups = data.groups[split]
    per_group: dict[str, list[float]] = defaultdict(list)
    device = next(model.parameters()).device
    set_len = data.cfg.cell_set_len
    for batch in data.loader(split, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        pred = model(batch).float().reshape(-1, set_len, data.table.dim)
        target = batch["pert_cell_emb"].float().reshape(-1, set_len, data.table.dim)
        for gi, value in zip(batch["group"].tolist(), energy(pred, target).tolist(), strict=True):
            per_group[groups[gi].name].append(value)
    means = {name: float(np.mean(v)) for name, v in sorted(per_group.items())}
    overall = float(np.mean(list(means.values()))) if means else float("nan")
    return {"overall": overall, "groups": means, "sets": sum(len(v) for v in per_group.values())}
