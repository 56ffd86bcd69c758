"""The optional cell-eval metrics: added for gene features when installed, skipped otherwise."""

import logging

import anndata
import numpy as np
import pytest

from st_finetune import celleval
from st_finetune.data import CellSetData
from st_finetune.evaluate import cell_eval_metrics, gene_rows, load_run
from st_finetune.genes import load_decoder

from .test_data import cfg_for, make_adata, write


def gene_data(tmp_path):
    embedded = make_adata(dim=20)
    expression = np.abs(embedded.obsm["X_state"]) + 1.0  # non-negative, log-expression-like
    adata = anndata.AnnData(X=expression, obs=embedded.obs)
    return CellSetData(cfg_for(write(adata, tmp_path), embed_key="X"), seed=0)


def test_skipped_for_embeddings(tmp_path, caplog):
    data = CellSetData(cfg_for(write(make_adata(), tmp_path)), seed=0)
    with caplog.at_level(logging.INFO, logger="st_finetune"):
        assert cell_eval_metrics(data, {"model": {}}) == []
    assert "not genes" in caplog.text


def test_skipped_when_not_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(celleval, "installed", lambda: False)
    ok, why = celleval.applies(gene_data(tmp_path))
    assert not ok and "pip install cell-eval" in why


@pytest.mark.skipif(not celleval.installed(), reason="cell-eval is not installed (optional extra)")
def test_metrics_added_for_gene_features(tmp_path):
    data = gene_data(tmp_path)
    perfect = {g.name: data.table.features[g.cells] for g in data.groups["test"]}
    rows = cell_eval_metrics(data, {"perfect": perfect})
    pearson = [r["value"] for r in rows if r["metric"] == "cell_eval_pearson_delta"]
    assert len(pearson) == len(data.groups["test"])
    assert np.allclose(pearson, 1.0)


def test_embeddings_with_a_gene_decoder_qualify(tiny_run, monkeypatch):
    _, data, _ = load_run(tiny_run)
    assert not celleval.applies(data)[0]
    monkeypatch.setattr(celleval, "installed", lambda: True)
    assert celleval.applies(data, load_decoder(tiny_run)) == (True, "")


@pytest.mark.skipif(not celleval.installed(), reason="cell-eval is not installed (optional extra)")
def test_metrics_on_decoded_genes(tiny_run):
    _, data, _ = load_run(tiny_run)
    decoder = load_decoder(tiny_run)
    # the observed perturbed cells' own embeddings as the prediction, decoded like any prediction:
    # cell-eval's Pearson delta is the same quantity as st_finetune's pearson_delta_genes
    observed = {g.name: data.table.features[g.cells] for g in data.groups["test"]}
    rows = cell_eval_metrics(data, {"decoded observed": observed}, "test", decoder)
    theirs = {r["group"]: r["value"] for r in rows if r["metric"] == "cell_eval_pearson_delta"}
    ours = {r["group"]: r["value"] for r in gene_rows(data, {"x": observed}, "test", decoder)["x"]
            if r["metric"] == "pearson_delta_genes"}  # fmt: skip
    assert set(theirs) == set(ours) == {g.name for g in data.groups["test"]}
    for group, value in ours.items():
        assert theirs[group] == pytest.approx(value, abs=1e-4), group
