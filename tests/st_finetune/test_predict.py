"""Predicting perturbed cells from a file of control cells with a trained run."""

import logging

import anndata
import numpy as np
import pytest
import torch
from scipy import sparse

from st_finetune.config import load_config
from st_finetune.data import DataError
from st_finetune.evaluate import load_model
from st_finetune.predict import cell_sets, main, predict
from st_finetune.train import run

from .conftest import overrides


def shams(study):
    adata = anndata.read_h5ad(study)
    return adata[adata.obs["condition"] == "sham"]


def test_every_control_cell_is_predicted_once_per_perturbation(tiny_run, inputs, tmp_path, caplog):
    run_dir, study = tiny_run, inputs[0]
    with caplog.at_level(logging.INFO, logger="st_finetune"):
        result = predict(run_dir, study, ["burn", "sham"], tmp_path / "pred.h5ad")
    assert (
        "trained in full" not in caplog.text and "mHC:" not in caplog.text
    )  # loading, not adapting
    assert "predicted burn, sham for" in caplog.text
    controls = shams(study)
    assert result.n_obs == 2 * controls.n_obs
    for pert in ("burn", "sham"):
        part = result[result.obs["condition"] == pert]
        assert sorted(part.obs["source_cell"]) == sorted(controls.obs_names)
        for column in ("cell_type", "timepoint", "mouse"):  # the inputs' annotations travel along
            source = controls.obs.loc[part.obs["source_cell"], column].to_numpy()
            assert (part.obs[column].to_numpy() == source).all()
    assert result.obsm["X_state"].shape == (result.n_obs, 64)
    assert np.isfinite(result.obsm["X_state"]).all()
    burn, sham = (result[result.obs["condition"] == p].obsm["X_state"] for p in ("burn", "sham"))
    assert not np.allclose(burn, sham)  # the perturbation code matters
    back = anndata.read_h5ad(tmp_path / "pred.h5ad")
    assert np.array_equal(back.obsm["X_state"], result.obsm["X_state"])
    assert back.uns["st_finetune"]["model"] == "finetuned"
    assert int(back.uns["st_finetune"]["cell_set_len"]) == 16


def test_predictions_are_the_models_on_whole_sets(tiny_run, inputs, tmp_path):
    run_dir, study = tiny_run, inputs[0]
    result = predict(run_dir, study, ["burn"], tmp_path / "pred.h5ad")
    model, perts = load_model(run_dir, "adapter")
    controls = shams(study)
    sizes = result.obs["cell_set"].value_counts()
    full = sizes[sizes == 16].index[:3]
    assert len(full) == 3
    for k in full:  # a set with no fill: the bidirectional, position-free model on those cells
        cells = result.obs[result.obs["cell_set"] == k]
        ctrl = torch.from_numpy(np.asarray(controls[cells["source_cell"]].obsm["X_state"]))
        code = torch.nn.functional.one_hot(torch.tensor(perts.index("burn")), len(perts)).float()
        with torch.no_grad():
            expected = model({"ctrl_cell_emb": ctrl, "pert_emb": code.expand(16, -1)})
        got = result[cells.index].obsm["X_state"]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_cell_sets_fill_short_sets_from_their_context():
    contexts = np.array(["a"] * 20 + ["b"] * 3)
    rows, kept = cell_sets(contexts, 8, seed=0)
    assert rows.shape == (4, 8)  # a: 8 + 8 + 4 (filled), b: 3 (filled)
    assert sorted(rows[kept]) == list(range(23))  # every cell kept exactly once
    for set_rows, set_kept in zip(rows, kept, strict=True):
        assert len(set(contexts[set_rows])) == 1  # one context per set
        fill = set_rows[~set_kept]
        if contexts[set_rows[0]] == "a":  # a context larger than a set
            assert not set(fill) & set(set_rows[set_kept])  # other cells of the context
    again, _ = cell_sets(contexts, 8, seed=0)
    other, _ = cell_sets(contexts, 8, seed=1)
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)


def test_the_pretrained_model_predicts_too(tiny_run, inputs, tmp_path):
    run_dir, study = tiny_run, inputs[0]
    tuned = predict(run_dir, study, ["burn"], tmp_path / "tuned.h5ad")
    before = predict(run_dir, study, ["burn"], tmp_path / "before.h5ad", model="pretrained")
    assert before.uns["st_finetune"]["model"] == "pretrained"
    assert not np.allclose(tuned.obsm["X_state"], before.obsm["X_state"])


def test_bad_requests_stop_with_one_message_and_keep_files(tiny_run, inputs, tmp_path, capsys):
    run_dir, study = tiny_run, inputs[0]
    out = tmp_path / "pred.h5ad"
    out.write_text("a previous result")
    assert main([str(run_dir), str(study), "--pert", "burn", "--out", str(out)]) == 1
    assert "exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "a previous result"
    with pytest.raises(ValueError, match=r"\['heat'\] are not the model's; it knows \['burn'"):
        predict(run_dir, study, ["heat"], tmp_path / "x.h5ad")
    burns = anndata.read_h5ad(study)
    burns = burns[burns.obs["condition"] == "burn"].copy()
    burns.write_h5ad(tmp_path / "burns.h5ad")
    with pytest.raises(DataError, match="no 'sham' cells"):
        predict(run_dir, tmp_path / "burns.h5ad", ["burn"], tmp_path / "x.h5ad")
    narrow = shams(study).copy()
    narrow.obsm["X_state"] = narrow.obsm["X_state"][:, :10]
    narrow.write_h5ad(tmp_path / "narrow.h5ad")
    with pytest.raises(DataError, match="has 10 features, but the model takes 64"):
        predict(run_dir, tmp_path / "narrow.h5ad", ["burn"], tmp_path / "x.h5ad")
    with pytest.raises(FileNotFoundError, match="is not a finished run"):
        predict(tmp_path, study, ["burn"], tmp_path / "x.h5ad")
    assert not (tmp_path / "x.h5ad").exists()


def test_a_file_without_the_perturbation_column_is_used_whole(tiny_run, inputs, tmp_path):
    run_dir, study = tiny_run, inputs[0]
    controls = shams(study).copy()
    del controls.obs["condition"]
    controls.write_h5ad(tmp_path / "unlabelled.h5ad")
    result = predict(run_dir, tmp_path / "unlabelled.h5ad", ["burn"], tmp_path / "pred.h5ad")
    assert result.n_obs == controls.n_obs
    assert set(result.obs["condition"]) == {"burn"}


def test_gene_features_come_back_as_X_with_the_inputs_genes(inputs, tmp_path):
    embedded = anndata.read_h5ad(inputs[0])
    genes = anndata.AnnData(X=sparse.csr_matrix(np.abs(embedded.obsm["X_state"]) + 1.0),
                            obs=embedded.obs)  # fmt: skip
    genes.var_names = [f"gene{i}" for i in range(genes.n_vars)]
    genes.write_h5ad(tmp_path / "genes.h5ad")
    run(load_config(None, overrides((tmp_path / "genes.h5ad", inputs[1]), tmp_path,
                                    **{"training.max_epochs": 1, "data.embed_key": "X"})))  # fmt: skip
    result = predict(tmp_path / "tiny", tmp_path / "genes.h5ad", ["burn"], tmp_path / "pred.h5ad")
    assert list(result.var_names) == list(genes.var_names)
    assert result.X.shape == (int((genes.obs["condition"] == "sham").sum()), genes.n_vars)
    assert np.isfinite(result.X).all() and not result.obsm
