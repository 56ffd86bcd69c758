"""The gene decoder (st_finetune.genes): reading genes, fitting, gene-space metrics, and the run's
decoder in evaluation and prediction."""

import logging

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from st_finetune import genes as G
from st_finetune.config import DataConfig, DecoderConfig
from st_finetune.data import CellTable, DataError, MissingGenes, load_cells
from st_finetune.demo import INFLAMMATORY_GENES, make_wound_study
from st_finetune.evaluate import evaluate_run, score_cohort, score_run
from st_finetune.predict import predict
from st_finetune.report import gene_section, plot_gene_shifts


def _file(path, X=None, layers=None, genes=("a", "b", "c"), n=12, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"condition": ["sham", "burn"] * (n // 2), "cell_type": "t"},
                       index=[f"c{i}" for i in range(n)])  # fmt: skip
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)) if X is not None
                            else None, layers=layers)  # fmt: skip
    adata.obsm["X_state"] = rng.normal(size=(n, 4)).astype(np.float32)
    adata.write_h5ad(path)
    return path


def _cfg(*paths, **kw):
    return DataConfig(paths=[str(p) for p in paths], timepoint_key=None, **kw)


def test_genes_are_read_from_X_or_a_layer_sparse_or_dense(tmp_path):
    dense = np.arange(36, dtype=np.float32).reshape(12, 3)
    _file(tmp_path / "a.h5ad", X=sparse.csr_matrix(dense), layers={"lognorm": dense + 1})
    table = load_cells(_cfg(tmp_path / "a.h5ad", gene_key="X"))  # obsm features: X stays on disk
    assert sparse.issparse(table.genes) and table.gene_names == ["a", "b", "c"]
    np.testing.assert_array_equal(table.genes.toarray(), dense)
    table = load_cells(_cfg(tmp_path / "a.h5ad", gene_key="lognorm"))
    np.testing.assert_array_equal(table.genes.toarray(), dense + 1)
    _file(tmp_path / "b.h5ad", X=dense)  # dense X on disk
    np.testing.assert_array_equal(load_cells(_cfg(tmp_path / "b.h5ad", gene_key="X")).genes.toarray(),
                                  dense)  # fmt: skip
    assert load_cells(_cfg(tmp_path / "b.h5ad")).genes is None  # no gene_key: not read


def test_missing_or_bad_genes_are_named(tmp_path):
    _file(tmp_path / "none.h5ad")
    with pytest.raises(MissingGenes, match="has no genes in X"):
        load_cells(_cfg(tmp_path / "none.h5ad", gene_key="X"))
    _file(tmp_path / "x.h5ad", X=np.ones((12, 3), np.float32))
    with pytest.raises(MissingGenes, match=r"no layer 'counts' \(data.gene_key\); layers: \[\]"):
        load_cells(_cfg(tmp_path / "x.h5ad", gene_key="counts"))
    bad = np.ones((12, 3), np.float32)
    bad[2, 1] = np.nan
    _file(tmp_path / "nan.h5ad", X=bad)
    with pytest.raises(DataError, match="NaN or Inf"):
        load_cells(_cfg(tmp_path / "nan.h5ad", gene_key="X"))
    with pytest.raises(ValueError, match="features are the genes already"):
        DataConfig(embed_key="X", gene_key="X")


def test_files_with_the_genes_in_another_order_are_aligned(tmp_path):
    dense = np.arange(36, dtype=np.float32).reshape(12, 3)
    _file(tmp_path / "a.h5ad", X=dense)
    _file(tmp_path / "b.h5ad", X=dense[:, [2, 0, 1]], genes=("c", "a", "b"))
    table = load_cells(_cfg(tmp_path / "a.h5ad", tmp_path / "b.h5ad", gene_key="X"))
    np.testing.assert_array_equal(table.genes.toarray(), np.concatenate([dense, dense]))
    _file(tmp_path / "c.h5ad", X=dense, genes=("a", "b", "z"))
    with pytest.raises(DataError, match=r"c.h5ad lacks 1 of a.h5ad's genes \(first: \['c'\]\)"):
        load_cells(_cfg(tmp_path / "a.h5ad", tmp_path / "c.h5ad", gene_key="X"))


def test_variable_genes_are_chosen_on_the_given_cells():
    genes = sparse.csr_matrix(np.array([[0, 5, 1], [0, -5, 1], [9, 0, 1], [-9, 0, 1]], np.float32))
    assert list(G.variable_genes(genes, np.array([0, 1]), 1)) == [1]
    assert list(G.variable_genes(genes, np.array([2, 3]), 1)) == [0]
    assert list(G.variable_genes(genes, np.array([0, 1]), 0)) == [0, 1, 2]


def _learnable_table(n=600, dim=6, n_genes=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    expression = np.log1p(np.exp(x @ rng.normal(size=(dim, n_genes)) * 0.7))  # softplus: >= 0
    table = CellTable(features=x, pert=np.array(["sham"] * n), cell_type=np.array(["t"] * n),
                      timepoint=np.array(["all"] * n), obs_names=np.arange(n).astype(str),
                      source=np.array(["f"] * n), control="sham", pert_names=["sham"],
                      genes=sparse.csr_matrix(expression.astype(np.float32)),
                      gene_names=[f"g{i}" for i in range(n_genes)])  # fmt: skip
    split = np.array(["train"] * (n - 200) + ["val"] * 100 + ["test"] * 100)
    return table, split


def test_the_decoder_learns_a_map_and_is_reproducible(tmp_path):
    table, split = _learnable_table()
    cfg = DecoderConfig(n_genes=30, hidden=64, max_epochs=60, patience=5, batch_size=64)
    decoder, info = G.fit_decoder(table, split, cfg, seed=3)
    assert info["genes"] == 30 and info["of_genes"] == 40 and decoder.nonnegative
    assert info["val_r2"] > 0.9 and info["test_r2"] > 0.9, info
    again, _ = G.fit_decoder(table, split, cfg, seed=3)  # same seed, same decoder
    for a, b in zip(decoder.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    G.save_decoder(decoder, info, tmp_path)
    loaded = G.load_decoder(tmp_path)
    assert loaded.gene_names == decoder.gene_names
    np.testing.assert_array_equal(loaded.decode(table.features), decoder.decode(table.features))
    assert G.load_decoder(tmp_path / "elsewhere") is None
    rows, cols = np.flatnonzero(split == "test"), G.variable_genes(table.genes, np.arange(400), 30)
    x, y_sparse = table.features[rows], table.genes[rows][:, cols]
    y = y_sparse.toarray().astype(np.float64)
    residual, total = ((decoder.decode(x) - y) ** 2).sum(), ((y - y.mean(0)) ** 2).sum()
    # a chunk of cells at a time: the same sums
    assert G.squared_error(decoder, x, y_sparse, chunk=7) == pytest.approx(residual, rel=1e-6)
    assert G.r_squared(decoder, x, y_sparse) == pytest.approx(1 - residual / total, rel=1e-6)
    assert info["test_r2"] == pytest.approx(1 - residual / total, rel=1e-6)


def test_without_a_validation_split_a_tenth_of_training_stops_it():
    table, split = _learnable_table()
    split[split == "val"] = "train"
    _, info = G.fit_decoder(table, split, DecoderConfig(hidden=16, max_epochs=2), seed=0)
    assert info["train_cells"] == 450 and info["epochs"] == 2


class _Linear:
    """A stand-in decoder: genes = embedding @ W."""

    def __init__(self, w):
        self.w, self.gene_names = w, [f"g{i}" for i in range(w.shape[1])]

    def decode(self, x):
        return x @ self.w


def _metrics(decoder, outputs, pred, ctrl, obs_genes, ctrl_genes):
    observed, scale, decoded = G.group_shifts(decoder, outputs, {"p": pred}, ctrl, obs_genes,
                                              ctrl_genes)  # fmt: skip
    return G.shift_metrics(decoded["p"], observed, scale)


def test_gene_metrics_of_a_perfect_and_of_a_shiftless_prediction():
    rng = np.random.default_rng(0)
    dec = _Linear(rng.normal(size=(5, 120)))
    ctrl = rng.normal(size=(30, 5))
    obs = ctrl + rng.normal(size=5)
    outputs = np.arange(120)
    perfect = _metrics(dec, outputs, obs, ctrl, dec.decode(obs), dec.decode(ctrl))
    assert perfect["pearson_delta_genes"] == pytest.approx(1.0)
    assert perfect["top_gene_overlap"] == 1.0
    none = _metrics(dec, outputs, ctrl, ctrl, dec.decode(obs), dec.decode(ctrl))
    assert np.isnan(none["pearson_delta_genes"]) and np.isnan(none["top_gene_overlap"])
    # the decoder's bias cancels: a constant offset on every decoded gene changes nothing
    biased = _Linear(dec.w)
    biased.decode = lambda x: x @ dec.w + 3.0
    assert _metrics(biased, outputs, obs, ctrl, dec.decode(obs), dec.decode(ctrl)) == perfect
    assert G.top_gene_overlap(np.arange(10.0), -np.arange(10.0)) == 1.0  # by |shift|, 5 of 10
    assert np.isnan(G.top_gene_overlap(np.arange(10.0), np.zeros(10)))  # nothing observed moved


def test_a_run_fits_its_decoder_and_evaluation_scores_genes(tiny_run):
    assert (tiny_run / G.FILE).is_file()
    frame = evaluate_run(tiny_run)
    overall = frame[frame["group"] == "overall"].pivot_table(index="variant", columns="metric",
                                                             values="value")  # fmt: skip
    for metric in G.GENE_DEFINITIONS:
        assert overall.loc[["tiny", "pretrained", "mean shift"], metric].notna().all(), metric
    reference = frame[frame["variant"] == "decoded observed"]  # gene metrics only
    assert set(reference["metric"]) == set(G.GENE_DEFINITIONS)
    assert (frame.loc[frame["metric"] == "top_gene_overlap", "value"].dropna().between(0, 1)).all()


def test_predictions_come_with_decoded_genes(tiny_run, inputs, tmp_path):
    result = predict(tiny_run, inputs[0], ["burn"], tmp_path / "pred.h5ad")
    decoder = G.load_decoder(tiny_run)
    assert list(result.var_names) == decoder.gene_names
    np.testing.assert_allclose(result.X, decoder.decode(result.obsm["X_state"]), rtol=1e-6)
    assert "gene decoder" in result.uns["st_finetune"]["X"]


def test_a_cohort_without_genes_is_scored_on_embeddings(tiny_run, tmp_path, caplog):
    cohort = anndata.read_h5ad(make_wound_study(tmp_path / "b.h5ad", seed=1))
    del cohort.X
    cohort.write_h5ad(tmp_path / "no_genes.h5ad")
    with caplog.at_level(logging.WARNING, logger="st_finetune"):
        rows, _, _ = score_cohort(tiny_run, [tmp_path / "no_genes.h5ad"])
    metrics = {r["metric"] for r in rows}
    assert "energy_distance" in metrics and not metrics & set(G.GENE_DEFINITIONS)
    assert "no gene-space metrics" in caplog.text
    rows, _, _ = score_cohort(tiny_run, [tmp_path / "b.h5ad"])  # with its genes: scored on them
    assert set(G.GENE_DEFINITIONS) <= {r["metric"] for r in rows}


def test_the_report_lists_the_genes_the_perturbation_moved_most(tiny_run, tmp_path):
    _, predictions, data = score_run(tiny_run)
    decoder = G.load_decoder(tiny_run)
    shifts = G.gene_shifts(data, predictions, decoder, ["pretrained", "tiny"])
    assert len(shifts) == len(decoder.gene_names) * len(data.groups["test"])
    lines = gene_section(shifts, ["pretrained", "tiny"], "")
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ")][1:]
    assert len(rows) == 3 * len(data.groups["test"])
    assert rows[0][:3] == ["macrophage", "10", "burn"]  # key wound-healing cell types first
    # the demo plants the inflammatory genes' rise in burn macrophages at day 10
    assert {r[3] for r in rows[:3]} <= set(INFLAMMATORY_GENES)
    group = next(g for g in data.groups["test"] if g.name == "macrophage | 10 | burn")
    column = data.table.gene_names.index(rows[0][3])
    observed = (data.table.genes[group.cells][:, column].mean()
                - data.table.genes[group.controls][:, column].mean())  # fmt: skip
    assert float(rows[0][4]) == pytest.approx(observed, abs=0.005)
    plot_gene_shifts(shifts, ["pretrained", "tiny"], tmp_path / "genes.png")
    assert (tmp_path / "genes.png").stat().st_size > 10_000


def test_predictions_can_carry_their_controls_decoded_alike(tiny_run, inputs, tmp_path):
    result = predict(tiny_run, inputs[0], ["burn"], tmp_path / "pred.h5ad", with_controls=True)
    shams = anndata.read_h5ad(inputs[0])
    shams = shams[shams.obs["condition"] == "sham"]
    controls = result[result.obs["condition"] == "sham"]
    assert controls.n_obs == shams.n_obs == result.n_obs // 2
    assert (controls.obs["cell_set"] == -1).all()
    assert list(controls.obs["source_cell"]) == list(shams.obs_names)
    np.testing.assert_array_equal(controls.obsm["X_state"], shams.obsm["X_state"])
    decoder = G.load_decoder(tiny_run)
    np.testing.assert_allclose(controls.X, decoder.decode(shams.obsm["X_state"]), rtol=1e-6)


def test_a_cohort_with_part_of_the_genes_is_scored_on_those(tiny_run, tmp_path, caplog):
    cohort = anndata.read_h5ad(make_wound_study(tmp_path / "b.h5ad", seed=1))
    cohort[:, cohort.var_names[20:]].copy().write_h5ad(tmp_path / "panel.h5ad")
    with caplog.at_level(logging.WARNING, logger="st_finetune"):
        rows, _, _ = score_cohort(tiny_run, [tmp_path / "panel.h5ad"])
    assert caplog.text.count("20 of the gene decoder's 200 genes are not in the cohort") == 1
    values = [r["value"] for r in rows if r["metric"] == "pearson_delta_genes"]
    assert values and np.isfinite(values).any()
