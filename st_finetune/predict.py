"""Predict perturbed cells from control cells with a trained run: ``python -m st_finetune.predict``.

    python -m st_finetune.predict runs/demo sham_cells.h5ad --pert burn --out burn_predicted.h5ad

The cells file is read with the run's data settings (``data.embed_key``, ``data.pert_col``,
``data.control_pert``, ``data.cell_type_key``, ``data.timepoint_key`` in its ``config.yaml``). Its
control cells are the inputs (every cell when the file has no ``data.pert_col`` column). As in
training, a cell set holds cells of one cell type and timepoint: each such context is shuffled
(``--seed``) and cut into sets of the model's ``cell_set_len``; a last, short set is filled up with
other cells of the context (drawn again when the context is smaller than a set), whose predictions
are dropped. So every input cell gets one prediction per perturbation; ST predicts a cell from the
whole set it is in, so another seed gives slightly different predictions.

Writes an AnnData with one row per input cell and perturbation: ``obs`` copied from the input, with
``data.pert_col`` set to the predicted perturbation, ``source_cell`` (the input cell's name) and
``cell_set`` (the set it was predicted in); the predictions where the inputs came from
(``obsm[data.embed_key]``, or ``X`` with the input's ``var``); when the run has a gene decoder
(``data.gene_key``, :mod:`st_finetune.genes`), the predicted embeddings' decoded genes in ``X``;
``uns["st_finetune"]`` records the run, the model, the perturbations, the set length and the seed.
``--with-controls`` adds the input cells themselves as rows of the control label (``cell_set``
-1), their genes decoded the same way: compare predicted with control cells within the file, so
that the decoder's own errors fall on both sides (measured expression against decoded expression
would show them as shifts). An existing file is never replaced
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import DataConfig
from .data import DataError, context_labels, obs_labels, opened_h5ad, read_features
from .evaluate import MODEL_FOLDERS, finished_run, load_model
from .genes import load_decoder
from .heldout import evaluating, evaluation_device

log = logging.getLogger("st_finetune")


def read_controls(
    file: Path, cfg: DataConfig
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame | None, str]:
    """``(obs, features, var, taken)`` of the file's control cells: ``var`` when the features are
    ``X``, ``taken`` a phrase saying which cells were taken."""
    if not file.is_file():
        raise DataError(f"cells file {file} does not exist")
    with opened_h5ad(file, cfg.embed_key) as adata:
        obs = adata.obs.copy()
        if cfg.pert_col in obs.columns:
            labels = obs_labels(obs, cfg.pert_col, file, "pert_col")
            keep = labels == cfg.control_pert
            if not keep.any():
                raise DataError(
                    f"{file.name}: no '{cfg.control_pert}' cells (data.control_pert) in obs column "
                    f"'{cfg.pert_col}', whose labels are {sorted(set(labels))}; the inputs are "
                    f"control cells (a file without a '{cfg.pert_col}' column is used whole)"
                )
            taken = f"{int(keep.sum()):,} '{cfg.control_pert}' cells of {adata.n_obs:,}"
        else:
            keep = np.ones(adata.n_obs, dtype=bool)
            taken = f"all {adata.n_obs:,} cells (no '{cfg.pert_col}' column)"
        features = read_features(adata, cfg.embed_key, file)[keep]
        var = adata.var.copy() if cfg.embed_key == "X" else None
    return obs[keep], features, var, taken


def contexts_of(obs: pd.DataFrame, cfg: DataConfig, file: Path) -> np.ndarray:
    """Each cell's (cell type, timepoint) context, as one label."""
    cell_type, timepoint = context_labels(obs, cfg, file)
    return np.char.add(np.char.add(cell_type.astype(str), " | "), timepoint.astype(str))


def cell_sets(contexts: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, kept)``, both ``(sets, size)``: the cells of each set (indices into
    ``contexts``) and which of them are predicted (the fill of a short set is not). Every cell is
    kept exactly once."""
    rng = np.random.default_rng(seed)
    rows, kept = [], []
    for context in sorted(set(contexts)):
        cells = rng.permutation(np.flatnonzero(contexts == context))
        for start in range(0, len(cells), size):
            chunk = cells[start : start + size]
            need = size - len(chunk)
            others = np.setdiff1d(cells, chunk) if need else chunk[:0]
            pool = others if len(others) >= need else cells  # a context smaller than a set
            fill = rng.choice(pool, need, replace=len(pool) < need)
            rows.append(np.concatenate([chunk, fill]))
            kept.append(np.arange(size) < len(chunk))
    return np.stack(rows), np.stack(kept)


@torch.no_grad()
def predict_sets(model: torch.nn.Module, features: np.ndarray, rows: np.ndarray, pert: int,
                 n_perts: int, batch_size: int, device: torch.device) -> np.ndarray:  # fmt: skip
    """The model's predictions for the sets ``rows`` under perturbation index ``pert``:
    ``(sets, size, features)`` float32."""
    size = rows.shape[1]
    code = torch.nn.functional.one_hot(torch.tensor(pert), n_perts).float().to(device)
    out = []
    with evaluating(model, device):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ctrl = torch.from_numpy(features[chunk.reshape(-1)]).to(device)
            batch = {"ctrl_cell_emb": ctrl, "pert_emb": code.expand(len(ctrl), -1)}
            out.append(model(batch).float().reshape(len(chunk), size, -1).cpu().numpy())
    return np.concatenate(out)


def predict(run_dir: str | Path, cells: str | Path, perts: list[str], out: str | Path, *,
            model: str = "finetuned", seed: int = 0, batch_size: int = 16,
            with_controls: bool = False, overwrite: bool = False):  # fmt: skip
    """Predict ``perts`` for the control cells in ``cells`` with the run's model; writes and
    returns the AnnData described in the module docstring (``with_controls``: the input cells
    too, as rows of the control label)."""
    import anndata

    run_dir, cells, out = Path(run_dir), Path(cells), Path(out)
    perts = list(dict.fromkeys(perts))  # each once
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    if out.suffix != ".h5ad":
        raise ValueError(f"--out must name an .h5ad file, got {out}")
    if model not in MODEL_FOLDERS:
        raise ValueError(f"model must be one of {list(MODEL_FOLDERS)}, got {model!r}")
    run_dir, run_cfg = finished_run(run_dir)
    cfg = run_cfg.data
    loaded = load_model(run_dir, MODEL_FOLDERS[model])
    if loaded is None:
        raise FileNotFoundError(f"{run_dir} has no {model} model ({MODEL_FOLDERS[model]}/)")
    net, pert_names = loaded
    unknown = [p for p in perts if p not in pert_names]
    if unknown:
        raise ValueError(f"perturbations {unknown} are not the model's; it knows {pert_names}")
    obs, features, var, taken = read_controls(cells, cfg)
    if features.shape[1] != net.config.input_dim:
        raise DataError(
            f"{cells.name}: '{cfg.embed_key}' has {features.shape[1]} features, but the "
            f"model takes {net.config.input_dim} (the run's data.embed_key features)"
        )
    contexts = contexts_of(obs, cfg, cells)
    size = net.config.cell_set_len
    rows, kept = cell_sets(contexts, size, seed)
    device = evaluation_device()
    parts = []
    for pert in perts:
        sets = predict_sets(net, features, rows, pert_names.index(pert), len(pert_names),
                            batch_size, device)  # fmt: skip
        predicted = np.empty((len(obs), sets.shape[-1]), dtype=np.float32)
        predicted[rows[kept]] = sets[kept]
        which_set = np.empty(len(obs), dtype=np.int64)
        which_set[rows[kept]] = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)[kept]
        part = obs.copy()
        part[cfg.pert_col] = pert
        part["source_cell"] = obs.index.astype(str)
        part["cell_set"] = which_set
        part.index = pd.Index((part["source_cell"] + ":" + pert).to_numpy())
        parts.append((part, predicted))
    if with_controls:  # the inputs as they are: the other side of a comparison in one file
        part = obs.assign(**{cfg.pert_col: cfg.control_pert, "source_cell": obs.index.astype(str),
                             "cell_set": -1})  # fmt: skip
        part.index = pd.Index((part["source_cell"] + ":" + cfg.control_pert).to_numpy())
        parts.append((part, features))
    frame = pd.concat([p for p, _ in parts])
    frame[cfg.pert_col] = frame[cfg.pert_col].astype("category")
    predicted = np.concatenate([x for _, x in parts])
    decoder = load_decoder(run_dir)
    if cfg.embed_key == "X" and var is not None and len(var) == predicted.shape[1]:
        result = anndata.AnnData(X=predicted, obs=frame, var=var)
    elif decoder is not None:  # the predicted embeddings' genes, by the run's gene decoder
        result = anndata.AnnData(X=decoder.decode(predicted), obs=frame,
                                 var=pd.DataFrame(index=decoder.gene_names),
                                 obsm={cfg.embed_key: predicted})  # fmt: skip
    else:
        result = anndata.AnnData(obs=frame, obsm={cfg.embed_key: predicted})
    result.uns["st_finetune"] = {
        "run": str(run_dir.resolve()), "model": model, "perturbations": list(perts),
        "cell_set_len": size, "seed": seed, "cells": str(cells.resolve()),
        "with_controls": with_controls,
        # a run has a gene decoder only with embedding features (data.gene_key refuses X)
        "X": "genes decoded from the predictions by the run's gene decoder"
        if decoder is not None else "",
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    result.write_h5ad(partial)
    partial.replace(out)  # a finished file or none: an interrupted write leaves no half file
    log.info("predicted %s for %s in %d (cell type, timepoint) contexts, %d sets of %d cells: %s",
             ", ".join(perts), taken, len(set(contexts)), len(rows), size, out)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    from .train import run_cli

    parser = argparse.ArgumentParser(
        prog="python -m st_finetune.predict",
        description="Predict perturbed cells from control cells with a trained run.",
    )
    parser.add_argument("run_dir", help="a finished run folder (python -m st_finetune.train)")
    parser.add_argument("cells", help=".h5ad with the control cells (the run's data settings)")
    parser.add_argument("--pert", action="append", required=True,
                        help="perturbation to predict; repeat for several")  # fmt: skip
    parser.add_argument("--out", required=True, help="the .h5ad to write")
    parser.add_argument("--model", choices=list(MODEL_FOLDERS), default="finetuned",
                        help="the fine-tuned model, or the same model before fine-tuning")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="how cells are grouped into sets")
    parser.add_argument("--batch-size", type=int, default=16, help="cell sets per forward pass")
    parser.add_argument("--with-controls", action="store_true",
                        help="also write the input cells (their genes decoded like the "
                             "predictions' when the run has a gene decoder)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    return run_cli(lambda: predict(args.run_dir, args.cells, args.pert, args.out,
                                   model=args.model, seed=args.seed, batch_size=args.batch_size,
                                   with_controls=args.with_controls,
                                   overwrite=args.overwrite))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
