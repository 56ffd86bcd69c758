"""Optional: Arc Institute's ``cell-eval`` metrics, on genes.

``pip install cell-eval`` (about a gigabyte of dependencies: scanpy, pdex, polars, ...) and the
evaluation adds its per-perturbation metrics (overlap, Pearson delta, MAE, discrimination, ...)
as rows named ``cell_eval_<metric>``. cell-eval compares expression profiles and runs differential
expression, so it needs genes: gene-expression features (``data.embed_key`` ``X`` or ``X_hvg``),
or embeddings such as ``X_state`` with the run's gene decoder (``data.gene_key``,
:mod:`st_finetune.genes`). Then the predicted cells and their control cells are both decoded, and
the observed cells and controls are the measured expression, so each side's shift is taken within
its own kind of values. Each (cell type, timepoint) context is evaluated on its own, against its
own control cells (cell-eval knows a single control label).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile

import numpy as np
import pandas as pd

from .data import CellSetData
from .genes import dense_rows, gene_columns

log = logging.getLogger("st_finetune")
GENE_KEYS = ("X", "X_hvg")


def installed() -> bool:
    return importlib.util.find_spec("cell_eval") is not None


def applies(data: CellSetData, decoder=None) -> tuple[bool, str]:
    """Whether cell-eval metrics can be added (on the features, or on the genes ``decoder``
    reads from them), and why not."""
    decoding = decoder is not None and data.table.genes is not None
    if data.cfg.embed_key not in GENE_KEYS and not decoding:
        return False, (f"features '{data.cfg.embed_key}' are not genes (cell-eval needs X or X_hvg, "
                       "or a gene decoder: data.gene_key)")  # fmt: skip
    if not installed():
        return False, "cell-eval is not installed (pip install cell-eval)"
    return True, ""


def _anndata(ctrl: np.ndarray, groups: dict[str, np.ndarray], control: str, genes: list[str]):
    import anndata

    labels = [control] * len(ctrl) + [p for p, cells in groups.items() for _ in range(len(cells))]
    matrix = np.concatenate([ctrl, *groups.values()]).astype(np.float32)
    obs = pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))])
    return anndata.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))


def _views(data: CellSetData, decoder):
    """``(gene names, observed(rows), predicted(values))``: the expression cell-eval compares."""
    t = data.table
    if decoder is None:
        return [f"feature_{i}" for i in range(t.dim)], lambda rows: t.features[rows], lambda x: x
    outputs, cols = gene_columns(decoder, t.gene_names)
    names = [decoder.gene_names[i] for i in outputs]
    return (names, lambda rows: dense_rows(t.genes, rows, cols),
            lambda x: decoder.decode(x)[:, outputs])  # fmt: skip


def cell_eval_rows(data: CellSetData, predictions: dict, variant: str, split: str = "test",
                   decoder=None) -> list[dict]:  # fmt: skip
    """cell-eval's per-perturbation metrics for one variant, per (cell type, timepoint) context;
    on the genes ``decoder`` reads from the predictions when given (see the module docstring)."""
    from cell_eval import MetricsEvaluator

    t = data.table
    genes, observed, predicted = _views(data, decoder)
    contexts: dict[tuple, list] = {}
    for g in data.groups[split]:
        if g.name in predictions and g.pert != t.control:
            contexts.setdefault((g.cell_type, g.timepoint), []).append(g)
    rows = []
    for (ct, tp), groups in sorted(contexts.items()):
        controls = groups[0].controls
        real = _anndata(observed(controls), {g.pert: observed(g.cells) for g in groups},
                        t.control, genes)  # fmt: skip
        pred = _anndata(
            predicted(t.features[controls]),
            {g.pert: predicted(predictions[g.name]) for g in groups},
            t.control,
            genes,
        )
        with tempfile.TemporaryDirectory() as outdir:
            evaluator = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=t.control,
                                         pert_col="target", outdir=outdir, num_threads=1)  # fmt: skip
            results, _ = evaluator.compute(profile="full", write_csv=False)
        for record in results.to_dicts():
            pert = record.pop("perturbation")
            for metric, value in record.items():
                if isinstance(value, int | float) and value is not None:
                    rows.append({"variant": variant, "group": f"{ct} | {tp} | {pert}",
                                 "metric": f"cell_eval_{metric}", "value": float(value),
                                 "cell_type": ct, "timepoint": tp})  # fmt: skip
    return rows
