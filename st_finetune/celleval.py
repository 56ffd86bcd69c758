"""Optional: Arc Institute's ``cell-eval`` metrics, for models whose features are genes.

``pip install cell-eval`` (about a gigabyte of dependencies: scanpy, pdex, polars, ...) and the
evaluation adds its per-perturbation metrics (overlap, Pearson delta, MAE, discrimination, ...)
as rows named ``cell_eval_<metric>``. cell-eval compares expression profiles and runs differential
expression, so it applies only to gene-expression features (``data.embed_key`` ``X`` or ``X_hvg``),
not to embeddings such as ``X_state``. Each (cell type, timepoint) context is evaluated on its own,
against its own control cells (cell-eval knows a single control label).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile

import numpy as np
import pandas as pd

from .data import CellSetData

log = logging.getLogger("st_finetune")
GENE_KEYS = ("X", "X_hvg")


def installed() -> bool:
    return importlib.util.find_spec("cell_eval") is not None


def applies(data: CellSetData) -> tuple[bool, str]:
    """Whether cell-eval metrics can be added, and why not."""
    if data.cfg.embed_key not in GENE_KEYS:
        return False, f"features '{data.cfg.embed_key}' are not genes (cell-eval needs X or X_hvg)"
    if not installed():
        return False, "cell-eval is not installed (pip install cell-eval)"
    return True, ""


def _anndata(ctrl: np.ndarray, groups: dict[str, np.ndarray], control: str, genes: list[str]):
    import anndata

    labels = [control] * len(ctrl) + [p for p, cells in groups.items() for _ in range(len(cells))]
    matrix = np.concatenate([ctrl, *groups.values()]).astype(np.float32)
    adata = anndata.AnnData(X=matrix, obs=pd.DataFrame({"target": labels}))
    adata.obs_names = [f"c{i}" for i in range(len(labels))]
    adata.var_names = genes
    return adata


def cell_eval_rows(data: CellSetData, predictions: dict, variant: str, split: str = "test"
                   ) -> list[dict]:  # fmt: skip
    """cell-eval's per-perturbation metrics for one variant, per (cell type, timepoint) context."""
    from cell_eval import MetricsEvaluator

    t = data.table
    genes = [f"feature_{i}" for i in range(t.dim)]
    contexts: dict[tuple, list] = {}
    for g in data.groups[split]:
        if g.name in predictions and g.pert != t.control:
            contexts.setdefault((g.cell_type, g.timepoint), []).append(g)
    rows = []
    for (ct, tp), groups in sorted(contexts.items()):
        ctrl = t.features[groups[0].controls]
        real = _anndata(ctrl, {g.pert: t.features[g.cells] for g in groups}, t.control, genes)
        pred = _anndata(ctrl, {g.pert: predictions[g.name] for g in groups}, t.control, genes)
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
