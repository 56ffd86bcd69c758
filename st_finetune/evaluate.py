"""Score a trained run on its held-out split: ``python -m st_finetune.evaluate RUN_DIR``.

Scored side by side, on the same held-out cell sets:

* the run's fine-tuned model (its ``adapter/``);
* ``pretrained``: the same model before fine-tuning (the run's ``pretrained_adapter/``: pretrained
  backbone, new heads at their initialisation, LoRA and mHC at identity);
* ``no change``: the control cells themselves as the prediction;
* ``mean shift``: control cells plus the mean observed shift (perturbed minus control) of the same
  cell type and timepoint in the training split (the cell type's average shift over the training
  timepoints when that timepoint is held out; the perturbation's average over all training groups
  when the cell type is).

Writes ``evaluation.csv`` (long format: variant, group, metric, value, cell_type, timepoint) in the
run folder and returns it as a DataFrame. ``--data FILE`` scores the run on another cohort's cells
instead (:func:`score_cohort`: every group of the file held out, the mean shift taken from the
run's own training split) into ``evaluation_<FILE's stem>.csv``. Metric definitions:
:mod:`st_finetune.metrics`. When the features are genes and Arc's ``cell-eval`` is installed, its
metrics are added as ``cell_eval_*`` rows (:mod:`st_finetune.celleval`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import genes as G
from . import metrics as M
from .config import load_config
from .data import CellSetData, DataError, Group, MissingGenes
from .heldout import evaluation_device, predicted_sets

log = logging.getLogger("st_finetune")
NO_CHANGE, MEAN_SHIFT, PRETRAINED = "no change", "mean shift", "pretrained"
# gene metrics of the observed cells' own embeddings, decoded: what predicting them exactly scores
DECODED_OBSERVED = "decoded observed"
BASELINES = (NO_CHANGE, MEAN_SHIFT)
# where a run keeps its models: the fine-tuned one, and the same model before fine-tuning
MODEL_FOLDERS = {"finetuned": "adapter", PRETRAINED: "pretrained_adapter"}


def predict_groups(model: torch.nn.Module, data: CellSetData, split: str = "test",
                   batch_size: int = 16,
                   device: torch.device | str = "cpu") -> tuple[dict, dict]:  # fmt: skip
    """Predictions (run on ``device``) and the control inputs they came from, pooled per group."""
    groups = data.groups[split]
    preds, inputs = defaultdict(list), defaultdict(list)
    for batch, out in predicted_sets(model, data, split, batch_size, device):
        ctrl = batch["ctrl_cell_emb"].reshape(out.shape)
        for gi, p, c in zip(batch["group"].tolist(), out.cpu().numpy(), ctrl.cpu().numpy(),
                            strict=True):  # fmt: skip
            preds[groups[gi].name].append(p)
            inputs[groups[gi].name].append(c)
    return ({k: np.concatenate(v) for k, v in preds.items()},
            {k: np.concatenate(v) for k, v in inputs.items()})  # fmt: skip


def mean_shift_predictions(data: CellSetData, inputs: dict, split: str = "test",
                           train_data: CellSetData | None = None) -> dict:  # fmt: skip
    """Control inputs plus the training split's mean shift (see the module docstring), that of
    ``train_data`` (the run's data) when ``data`` is another cohort's."""
    source = train_data if train_data is not None else data
    t, train = source.table, source.split == "train"
    is_ctrl = t.pert == t.control

    def mean(mask):
        return t.features[mask].mean(0) if mask.any() else None

    shifts = {}
    for g in source.groups["train"]:
        ctrl = mean(train & is_ctrl & (t.cell_type == g.cell_type) & (t.timepoint == g.timepoint))
        if ctrl is None:
            ctrl = mean(train & is_ctrl & (t.cell_type == g.cell_type))
        shifts[(g.cell_type, g.timepoint, g.pert)] = t.features[g.cells].mean(0) - ctrl
    out = {}
    for g in data.groups[split]:
        shift = shifts.get((g.cell_type, g.timepoint, g.pert))
        if shift is None:
            same_type = [v for (ct, _, p), v in shifts.items() if ct == g.cell_type and p == g.pert]
            same_pert = [v for (_, _, p), v in shifts.items() if p == g.pert]
            shift = np.mean(same_type or same_pert or [np.zeros(t.dim)], axis=0)
        out[g.name] = inputs[g.name] + shift
    return out


def _row(variant: str, group: str, metric: str, value, cell_type: str = "",
         timepoint: str = "") -> dict:  # fmt: skip
    return {"variant": variant, "group": group, "metric": metric, "value": float(value),
            "cell_type": cell_type, "timepoint": timepoint}  # fmt: skip


def score(data: CellSetData, predictions: dict, variant: str, split: str = "test",
          genes: list[dict] = ()) -> list[dict]:  # fmt: skip
    """Every metric per group, plus per-cell-type temporal coherence, this variant's gene-space
    rows ``genes`` (:func:`gene_rows`), and overall means."""
    t = data.table
    groups: list[Group] = [g for g in data.groups[split] if g.name in predictions]
    rows = []
    pred_means, obs_means = [], []
    for g in groups:
        pred, obs, ctrl = predictions[g.name], t.features[g.cells], t.features[g.controls]
        pred_means.append(pred.mean(0))
        obs_means.append(obs.mean(0))
        for name, value in (("energy_distance", M.energy_distance(pred, obs)),
                            ("nn_distance_norm", M.nn_distance_norm(pred, obs)),
                            ("pearson_delta", M.pearson_delta(pred, obs, ctrl)),
                            ("mae_mean", M.mae_mean(pred, obs))):  # fmt: skip
            rows.append(_row(variant, g.name, name, value, g.cell_type, g.timepoint))
    for g, value in zip(groups, M.discrimination(np.array(pred_means), np.array(obs_means)),
                        strict=True):  # fmt: skip
        rows.append(_row(variant, g.name, "discrimination", value, g.cell_type, g.timepoint))
    by_type = defaultdict(lambda: ({}, {}))
    for g, pm, om in zip(groups, pred_means, obs_means, strict=True):
        ctrl_mean = t.features[g.controls].mean(0)
        pred_shift, obs_shift = by_type[(g.cell_type, g.pert)]
        pred_shift[g.timepoint] = pm - ctrl_mean
        obs_shift[g.timepoint] = om - ctrl_mean
    for (ct, pert), (ps, os_) in sorted(by_type.items()):
        rows.append(_row(variant, f"{ct} | {pert}", "temporal_coherence",
                         M.temporal_coherence(ps, os_), ct))  # fmt: skip
    return with_overall(rows + list(genes), variant)


def gene_rows(data: CellSetData, predictions: dict, split: str, decoder) -> dict[str, list[dict]]:
    """Each variant's gene-space metrics per group (:func:`st_finetune.genes.shift_metrics`), for
    ``predictions``: variant -> group name -> embeddings; no rows when the data has none of the
    decoder's genes."""
    rows = {name: [] for name in predictions}
    for g, _, observed, scale, decoded in G.each_group_shifts(data, predictions, decoder, split):
        for name, shift in decoded.items():
            found = G.shift_metrics(shift, observed, scale)
            rows[name] += [_row(name, g.name, metric, value, g.cell_type, g.timepoint)
                           for metric, value in found.items()]  # fmt: skip
    return rows


def with_overall(rows: list[dict], variant: str) -> list[dict]:
    """``rows`` and, per metric, its mean over them (NaN left out) as an ``overall`` row."""
    overall = [_row(variant, "overall", metric, np.nanmean(values) if values.notna().any()
                    else np.nan)
               for metric, values in pd.DataFrame(rows).groupby("metric")["value"]]  # fmt: skip
    return rows + overall


def run_stability_rows(run_dir: Path, variant: str) -> list[dict]:
    """Training stability and efficiency of a run, as ``overall`` rows."""
    from .plots import read_metrics

    rows = []
    stats = M.training_stability(read_metrics(run_dir / "metrics.csv"))
    summary = json.loads((run_dir / "summary.json").read_text())
    stats.update({
        "trainable_params": summary["parameters"]["trainable"],
        "trainable_percent": summary["parameters"]["percent"],
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "peak_memory_mb": summary["peak_memory_mb"],
    })  # fmt: skip
    for metric, value in stats.items():
        rows.append({"variant": variant, "group": "overall", "metric": metric,
                     "value": float(value), "cell_type": "", "timepoint": ""})  # fmt: skip
    return rows


def finished_run(run_dir: str | Path):
    """``(run folder, its config)``, or FileNotFoundError when the run has not finished."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no summary.json)")
    return run_dir, load_config(run_dir / "config.yaml")


def load_run(run_dir: str | Path):
    """The run's config, data (same splits) and fine-tuned + pretrained models."""
    run_dir, cfg = finished_run(run_dir)
    models = {name: model for name, (model, _) in run_models(run_dir, cfg).items()}
    return cfg, run_data(run_dir, cfg), models


def run_data(run_dir: Path, cfg) -> CellSetData:
    """The run's data with its splits, checked against the ``splits.csv`` it wrote."""
    data = CellSetData(cfg.data, cfg.training.seed)
    saved = pd.read_csv(run_dir / "splits.csv")
    if len(saved) != len(data.split) or (saved["split"].to_numpy() != data.split).any():
        raise ValueError(f"the data under {cfg.data.paths} no longer gives {run_dir}'s splits")
    return data


def run_models(run_dir: Path, cfg) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """The run's fine-tuned model (under the run's name) and pretrained one, those it has, each
    with its perturbation names (:func:`load_model`)."""
    names = {"finetuned": cfg.name, PRETRAINED: PRETRAINED}
    loaded = {names[which]: load_model(run_dir, folder) for which, folder in MODEL_FOLDERS.items()}
    return {name: model for name, model in loaded.items() if model is not None}


def load_model(run_dir: str | Path, folder: str) -> tuple[torch.nn.Module, list[str]] | None:
    """A run's model from ``folder`` (``adapter``: fine-tuned, ``pretrained_adapter``: before
    fine-tuning) in eval mode, with its perturbation names (sorted: its one-hot order); ``None``
    when the run has no model there."""
    from .model import load_finetuned, load_pretrained

    path = Path(run_dir) / folder
    if (path / "manifest.json").is_file():
        model, manifest = load_finetuned(path)
        return model, manifest["pert_names"]
    if (path / "model.ckpt").is_file():  # a run without a base checkpoint: a whole checkpoint
        model, info = load_pretrained(path / "model.ckpt")
        return model, info.pert_names
    return None


def score_run(run_dir: str | Path, split: str = "test", baselines: bool = True):
    """``(rows, predictions by variant, data)`` for a run, its pretrained model and baselines."""
    run_dir = Path(run_dir)
    cfg, data, models = load_run(run_dir)
    predictions, inputs = {}, None
    device = evaluation_device()
    for name, model in models.items():
        predictions[name], inputs = predict_groups(model, data, split, device=device)
    if baselines and inputs is not None:
        predictions[NO_CHANGE] = inputs
        predictions[MEAN_SHIFT] = mean_shift_predictions(data, inputs, split)
    rows = score_variants(data, predictions, split, G.load_decoder(run_dir), reference=baselines)
    return rows + run_stability_rows(run_dir, cfg.name), predictions, data


def score_variants(data: CellSetData, predictions: dict, split: str, decoder,
                   reference: bool = True) -> list[dict]:  # fmt: skip
    """:func:`score` of every variant in ``predictions``; with a gene ``decoder`` and
    ``reference``, the ``decoded observed`` rows (the gene metrics a model would score if it
    predicted the observed perturbed cells' embeddings exactly); cell-eval's where it applies."""
    scored = dict(predictions)
    if reference and decoder is not None:
        scored[DECODED_OBSERVED] = {g.name: data.table.features[g.cells]
                                    for g in data.groups[split]}  # fmt: skip
    genes = gene_rows(data, scored, split, decoder) if decoder is not None else {}
    rows = [row for name, preds in predictions.items()
            for row in score(data, preds, name, split, genes.get(name, []))]  # fmt: skip
    if genes.get(DECODED_OBSERVED):
        rows += with_overall(genes[DECODED_OBSERVED], DECODED_OBSERVED)
    return rows + cell_eval_metrics(data, predictions, split, decoder)


def score_cohort(run_dir: str | Path, paths: list[str]):
    """``(rows, predictions by variant, data)`` for the run's fine-tuned and pretrained models on
    the cells of ``paths`` (another cohort, read with the run's data settings, every group
    scored), beside *no change* and the *mean shift* of the run's own training split."""
    run_dir, cfg = finished_run(run_dir)
    models = run_models(run_dir, cfg)
    decoder = G.load_decoder(run_dir)
    settings = dataclasses.replace(cfg.data, paths=[str(p) for p in paths])
    try:
        data = CellSetData.unseen(settings, models[cfg.name][1])
    except MissingGenes as err:  # a cohort without the run's genes is still scored on embeddings
        log.warning("no gene-space metrics: %s", err)
        decoder = None
        data = CellSetData.unseen(dataclasses.replace(settings, gene_key=None),
                                  models[cfg.name][1])  # fmt: skip
    if decoder is not None:
        missing = set(decoder.gene_names) - set(data.table.gene_names)
        if len(missing) == len(decoder.gene_names):
            log.warning("no gene-space metrics: the cohort has none of the gene decoder's genes")
            decoder = None
        elif missing:
            log.warning("%d of the gene decoder's %d genes are not in the cohort (e.g. %s): gene "
                        "metrics use the other %d", len(missing), len(decoder.gene_names),
                        sorted(missing)[:3], len(decoder.gene_names) - len(missing))  # fmt: skip
    predictions, device = {}, evaluation_device()
    for name, (model, _) in models.items():
        predictions[name], inputs = predict_groups(model, data, "test", device=device)
    predictions[NO_CHANGE] = inputs
    try:  # the mean shift comes from the cohort the run was trained on
        predictions[MEAN_SHIFT] = mean_shift_predictions(data, inputs, "test",
                                                         run_data(run_dir, cfg))  # fmt: skip
    except (DataError, ValueError) as err:
        log.warning("no mean-shift baseline: the run's training data cannot be read (%s)", err)
    return score_variants(data, predictions, "test", decoder), predictions, data


def cell_eval_metrics(data: CellSetData, predictions: dict, split: str = "test",
                      decoder=None) -> list[dict]:  # fmt: skip
    """Arc's cell-eval metrics when it is installed and the features are genes (or the run has
    a gene ``decoder``); else nothing."""
    from . import celleval

    ok, why = celleval.applies(data, decoder)
    if not ok:
        log.info("cell-eval metrics skipped: %s", why)
        return []
    decoder = decoder if data.cfg.embed_key not in celleval.GENE_KEYS else None
    rows = []
    for name, preds in predictions.items():
        rows += celleval.cell_eval_rows(data, preds, name, split, decoder)
    return rows


def evaluate_run(run_dir: str | Path, split: str = "test", baselines: bool = True) -> pd.DataFrame:
    """Score a run and its baselines on ``split``; writes ``evaluation.csv`` in the run folder."""
    frame = pd.DataFrame(score_run(run_dir, split, baselines)[0])
    frame.to_csv(Path(run_dir) / "evaluation.csv", index=False)
    return frame


def shift_trajectories(data: CellSetData, predictions: dict, split: str = "test") -> pd.DataFrame:
    """Per cell type and timepoint: observed shift size, and each variant's shift projected on it."""
    t = data.table
    rows = []
    labels = sorted({g.timepoint for g in data.groups[split]}, key=M.timepoint_key)
    numbered = all(M.day_of(tp) is not None for tp in labels)
    for g in data.groups[split]:
        ctrl = t.features[g.controls].mean(0)
        observed = t.features[g.cells].mean(0) - ctrl
        size = float(np.linalg.norm(observed))
        # the x position: the label's number ("D14" -> 14), or its rank when some have none
        day = M.day_of(g.timepoint) if numbered else float(labels.index(g.timepoint))
        base = {"cell_type": g.cell_type, "timepoint": g.timepoint, "day": day, "pert": g.pert}
        rows.append({**base, "variant": "observed", "shift": size})
        for variant, preds in predictions.items():
            if g.name in preds:
                shift = preds[g.name].mean(0) - ctrl
                rows.append({**base, "variant": variant,
                             "shift": float(shift @ observed / max(size, 1e-12))})  # fmt: skip
    return pd.DataFrame(rows)


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    overall = frame[frame["group"] == "overall"]
    table = overall.pivot_table(index="variant", columns="metric", values="value", sort=False)
    return table[[m for m in {**M.DEFINITIONS, **G.GENE_DEFINITIONS} if m in table.columns]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m st_finetune.evaluate",
        description="Score a trained run on its held-out split.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--data", nargs="+", metavar="H5AD",
                        help="score another cohort's cells instead of the run's held-out split "
                             "(.h5ad files or folders, read with the run's data settings)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.data and args.split != "test":
        parser.error("--split chooses among the run's own cells; --data scores other cells")
    from .train import run_cli

    def job():
        if args.data:
            frame = pd.DataFrame(score_cohort(args.run_dir, args.data)[0])
            path = Path(args.run_dir) / f"evaluation_{Path(args.data[0]).stem}.csv"
            frame.to_csv(path, index=False)
        else:
            frame = evaluate_run(args.run_dir, args.split)
            path = Path(args.run_dir) / "evaluation.csv"
        with pd.option_context("display.width", 160, "display.max_columns", None,
                               "display.precision", 4):  # fmt: skip
            print(headline_table(frame))
        print(f"wrote {path}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
