"""Genes from embeddings: a decoder fitted on the study's own cells.

ST predicts in the space it reads, e.g. SE-600M embeddings (``obsm["X_state"]``), but a
biologist reads genes. When the data also holds gene expression (``data.gene_key``: ``X`` or a
``layers`` name, log-normalised values), each run fits a decoder embedding -> expression of the
most variable genes (``decoder.n_genes``, chosen on the training cells) on the observed cells of its
training split, every condition, with early stopping on the validation split. The decoder depends
on the data, the split and the seed only, never on the model: the variants of one seed get the
same decoder, so their decoded predictions differ only by what the models predicted.

The evaluation compares decoded shifts with observed ones: a prediction's shift is its decoded
mean minus its control cells' decoded mean (so the decoder's own bias cancels), the observed shift
is the perturbed cells' mean expression minus the control cells' (see ``GENE_DEFINITIONS``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import DecoderConfig

FILE = "gene_decoder.pt"
TOP_GENES = 50

GENE_DEFINITIONS = {
    "pearson_delta_genes": "Pearson correlation over the decoded genes between the predicted "
    "shift (decoded prediction minus the decoded control cells, means) and the observed shift "
    "(mean expression of the perturbed minus the control cells). Higher is better.",
    "top_gene_overlap": f"Of the {TOP_GENES} genes the perturbation moved most (largest observed "
    "|shift| in units of the gene's standard deviation in the control cells, so noisy genes do not "
    f"crowd out consistent ones; half the decoded genes when there are fewer than {2 * TOP_GENES}),"
    " the fraction also among the predicted shift's largest on the same scale. Higher is better.",
}


class GeneDecoder(nn.Module):
    """Embedding -> gene expression: two hidden layers (LayerNorm, GELU); a ReLU output when the
    expression it learned is never negative (log-normalised counts)."""

    def __init__(self, embed_dim: int, gene_names: list[str], hidden: int = 1024,
                 nonnegative: bool = True):  # fmt: skip
        super().__init__()
        self.gene_names = list(gene_names)
        self.nonnegative = nonnegative
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, len(self.gene_names)),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.relu(out) if self.nonnegative else out

    @torch.no_grad()
    def decode(self, x: np.ndarray, batch: int = 8192) -> np.ndarray:
        """``(cells, genes)`` float32 for embeddings ``x (cells, D)``, on the decoder's device."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = [self(torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
                    .to(device)).cpu().numpy() for i in range(0, len(x), batch)]  # fmt: skip
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, len(self.gene_names)), np.float32)


def variable_genes(genes, rows: np.ndarray, n: int) -> np.ndarray:
    """Column indices (ascending) of the ``n`` genes of largest variance over ``rows`` (all
    genes for ``n = 0`` or ``n`` at least their number)."""
    if n == 0 or n >= genes.shape[1]:
        return np.arange(genes.shape[1])
    sub = genes[rows]
    mean = np.asarray(sub.mean(0)).ravel()
    var = np.asarray(sub.multiply(sub).mean(0)).ravel() - mean**2
    return np.sort(np.argsort(-var, kind="stable")[:n])


def dense_rows(genes, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Expression of cells ``rows`` on columns ``cols`` of the CSR ``genes``, dense float32."""
    return np.asarray(genes[rows][:, cols].todense(), dtype=np.float32)


def fit_decoder(table, split: np.ndarray, cfg: DecoderConfig, seed: int,
                device: torch.device | str = "cpu") -> tuple[GeneDecoder, dict]:  # fmt: skip
    """Fit the decoder on the training split's cells (every condition) and return it (on the CPU)
    with its record: genes, epochs, validation and test R^2 (share of the expression variance of
    those cells that the decoded embeddings explain). Expression stays sparse but for one batch of
    cells at a time."""
    train = np.flatnonzero(split == "train")
    stop = np.flatnonzero(split == "val")
    rng = np.random.default_rng([seed, 11])
    if len(stop) == 0:  # no validation split: stop on a tenth of the training cells
        train, n_stop = rng.permutation(train), max(1, len(train) // 10)
        stop, train = train[:n_stop], train[n_stop:]
    cols = variable_genes(table.genes, train, cfg.n_genes)
    names = [table.gene_names[i] for i in cols]
    y_train = table.genes[train][:, cols]
    x_train = torch.from_numpy(table.features[train])
    x_stop, y_stop = table.features[stop], table.genes[stop][:, cols]  # read once, every epoch
    torch.manual_seed(seed)
    decoder = GeneDecoder(table.dim, names, cfg.hidden, nonnegative=bool(y_train.min() >= 0))
    decoder.to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(seed)
    best, best_state, since, epochs = math.inf, None, 0, 0
    for epoch in range(cfg.max_epochs):
        decoder.train()
        for idx in torch.randperm(len(train), generator=order).split(cfg.batch_size):
            x = x_train[idx].to(device)
            y = torch.from_numpy(y_train[idx.numpy()].toarray()).to(device)
            loss = torch.nn.functional.mse_loss(decoder(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        error = squared_error(decoder, x_stop, y_stop)
        epochs = epoch + 1
        if error < best:
            best, since = error, 0
            best_state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
        else:
            since += 1
            if since >= cfg.patience:
                break
    decoder.load_state_dict(best_state)
    decoder.cpu().eval()
    test = np.flatnonzero(split == "test")
    info = {"genes": len(names), "of_genes": int(table.genes.shape[1]), "epochs": epochs,
            "train_cells": int(len(train)), "val_r2": r_squared(decoder, x_stop, y_stop),
            "test_r2": r_squared(decoder, table.features[test], table.genes[test][:, cols])
            if len(test) else None}  # fmt: skip
    return decoder, info


def squared_error(decoder: GeneDecoder, x: np.ndarray, y, chunk: int = 4096) -> float:
    """Sum over cells and genes of the squared difference between the decoded embeddings ``x``
    and the expression ``y`` (CSR, the same cells, the decoder's genes), in float64, a chunk of
    cells at a time."""
    residual = 0.0
    for start in range(0, len(x), chunk):
        decoded = decoder.decode(x[start : start + chunk]).astype(np.float64)
        residual += float(((decoded - y[start : start + chunk].toarray()) ** 2).sum())
    return residual


def r_squared(decoder: GeneDecoder, x: np.ndarray, y) -> float:
    """1 - residual / total sum of squares (around each gene's mean over these cells) of the
    decoded embeddings ``x`` against the expression ``y`` (as for :func:`squared_error`)."""
    y = y.astype(np.float64)
    mean = np.asarray(y.mean(0)).ravel()
    total = float(np.asarray(y.multiply(y).sum(0)).ravel().sum() - y.shape[0] * (mean**2).sum())
    return 1.0 - squared_error(decoder, x, y) / total if total > 0 else float("nan")


def save_decoder(decoder: GeneDecoder, info: dict, run_dir: Path) -> Path:
    """Write ``run_dir/gene_decoder.pt`` (weights, genes, shape and the fit's record: tensors,
    lists and numbers only, so :func:`load_decoder` reads it with ``weights_only=True``)."""
    path = Path(run_dir) / FILE
    torch.save({"state_dict": decoder.state_dict(), "gene_names": decoder.gene_names,
                "embed_dim": decoder.net[0].in_features, "hidden": decoder.net[0].out_features,
                "nonnegative": decoder.nonnegative, "info": info}, path)  # fmt: skip
    return path


def load_decoder(run_dir: str | Path) -> GeneDecoder | None:
    """The run's gene decoder (eval mode, CPU), or ``None`` when it has none."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    decoder = GeneDecoder(saved["embed_dim"], saved["gene_names"], saved["hidden"],
                          saved["nonnegative"])  # fmt: skip
    decoder.load_state_dict(saved["state_dict"])
    return decoder.eval()


def gene_columns(decoder: GeneDecoder, gene_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(decoder outputs, table columns)`` of the decoder's genes that the table has (another
    cohort's file may lack some: :func:`st_finetune.evaluate.score_cohort` says so)."""
    where = {g: i for i, g in enumerate(gene_names)}
    pairs = [(i, where[g]) for i, g in enumerate(decoder.gene_names) if g in where]
    out, cols = zip(*pairs, strict=True) if pairs else ((), ())
    return np.array(out, dtype=np.int64), np.array(cols, dtype=np.int64)


def control_scale(ctrl_genes: np.ndarray) -> np.ndarray:
    """Each gene's standard deviation in the control cells, at least a tenth of their mean (genes
    silent in the controls: induced genes rank high, not infinitely)."""
    sd = ctrl_genes.std(0)
    return np.maximum(sd, 0.1 * sd.mean()) if sd.mean() > 0 else np.ones_like(sd)


def top_gene_overlap(pred_shift: np.ndarray, obs_shift: np.ndarray, scale=None) -> float:
    """See ``GENE_DEFINITIONS`` (shifts divided by ``scale``, :func:`control_scale`); NaN for a
    prediction without any shift, or an observation without any (a control-to-control set)."""
    if not np.any(pred_shift) or not np.any(obs_shift):
        return float("nan")
    k = min(TOP_GENES, len(obs_shift) // 2)
    if k < 1:
        return float("nan")
    scale = 1.0 if scale is None else scale
    top_obs = np.argsort(-np.abs(obs_shift / scale), kind="stable")[:k]
    top_pred = np.argsort(-np.abs(pred_shift / scale), kind="stable")[:k]
    return len(np.intersect1d(top_obs, top_pred)) / k


def group_shifts(decoder: GeneDecoder, outputs: np.ndarray, predicted: dict[str, np.ndarray],
                 ctrl: np.ndarray, obs_genes: np.ndarray, ctrl_genes: np.ndarray):  # fmt: skip
    """One group's shifts: ``(observed, scale, {name: decoded})``. ``predicted`` maps a name to
    predicted embeddings, ``ctrl`` holds the control cells' embeddings (their decoded mean is
    subtracted, so the decoder's own bias cancels); ``obs_genes`` and ``ctrl_genes``: measured
    expression on the decoder outputs ``outputs``; ``scale``: :func:`control_scale`."""
    base = decoder.decode(ctrl)[:, outputs].mean(0)
    decoded = {name: decoder.decode(x)[:, outputs].mean(0) - base for name, x in predicted.items()}
    return obs_genes.mean(0) - ctrl_genes.mean(0), control_scale(ctrl_genes), decoded


def shift_metrics(pred_shift: np.ndarray, obs_shift: np.ndarray,
                  scale: np.ndarray) -> dict[str, float]:  # fmt: skip
    """The gene-space metrics (``GENE_DEFINITIONS``) of one predicted shift against the observed
    one (:func:`group_shifts`)."""
    if pred_shift.std() == 0 or obs_shift.std() == 0:
        corr = float("nan")
    else:
        corr = float(np.corrcoef(pred_shift, obs_shift)[0, 1])
    overlap = top_gene_overlap(pred_shift, obs_shift, scale)
    return {"pearson_delta_genes": corr, "top_gene_overlap": overlap}


def each_group_shifts(data, predictions: dict, decoder: GeneDecoder, split: str = "test"):
    """Per held-out group that has predictions: ``(group, outputs, observed, scale, {variant:
    decoded})`` (:func:`group_shifts`; ``outputs``: the decoder's genes that the data has), for
    ``predictions``: variant -> group name -> embeddings. A group's expression is read and its
    controls decoded once for every variant. Nothing when the data has none of the genes."""
    t = data.table
    if t.genes is None:
        return
    outputs, cols = gene_columns(decoder, t.gene_names)
    if not len(cols):
        return
    for g in data.groups[split]:
        predicted = {v: preds[g.name] for v, preds in predictions.items() if g.name in preds}
        if predicted:
            yield (g, outputs,
                   *group_shifts(decoder, outputs, predicted, t.features[g.controls],
                                 dense_rows(t.genes, g.cells, cols),
                                 dense_rows(t.genes, g.controls, cols)))  # fmt: skip


def gene_shifts(data, predictions: dict, decoder: GeneDecoder, variants: list[str],
                split: str = "test") -> pd.DataFrame:  # fmt: skip
    """Every decoded gene of every held-out group: its observed shift (mean expression of the
    perturbed minus the control cells), that shift over :func:`control_scale` (``effect``), and
    each variant's decoded shift (:func:`each_group_shifts`)."""
    chosen = {v: predictions[v] for v in variants if v in predictions}
    names = np.array(decoder.gene_names)
    frames = [pd.DataFrame({"cell_type": g.cell_type, "timepoint": g.timepoint, "pert": g.pert,
                            "gene": names[outputs], "observed": observed,
                            "effect": observed / scale, **decoded})
              for g, outputs, observed, scale, decoded
              in each_group_shifts(data, chosen, decoder, split)]  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def top_gene_shifts(shifts: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Of :func:`gene_shifts`, the ``top`` genes of each group that the perturbation moved most
    (largest |effect|), in that order."""
    order = shifts.assign(size=-shifts["effect"].abs()).sort_values("size", kind="stable")
    return (
        order.groupby(["cell_type", "timepoint", "pert"], sort=False).head(top).drop(columns="size")
    )
