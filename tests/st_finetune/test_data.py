"""AnnData input: validation errors, groups and control matching, splits, set sampling."""

import logging

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from st_finetune.config import DataConfig
from st_finetune.data import CellSetData, DataError, load_cells, make_splits


def make_adata(counts=None, dim=6, seed=0):
    """Two cell types x two days x sham/burn; ``counts`` overrides (type, day, cond) sizes."""
    rng = np.random.default_rng(seed)
    counts = {**{(t, d, c): 20 for t in ("mac", "fib") for d in (10, 14) for c in ("sham", "burn")},
              **(counts or {})}  # fmt: skip
    rows = [(c, t, d) for (t, d, c), n in counts.items() for _ in range(n)]
    obs = pd.DataFrame(rows, columns=["condition", "cell_type", "timepoint"])
    obs["condition"] = obs["condition"].astype("category")
    obs["cell_type"] = obs["cell_type"].astype("category")
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = anndata.AnnData(obs=obs)
    shift = (obs["condition"] == "burn").to_numpy()[:, None] * 2.0
    adata.obsm["X_state"] = (rng.normal(size=(len(obs), dim)) + shift).astype(np.float32)
    return adata


def write(adata, tmp_path, name="d.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def cfg_for(path, **kw):
    return DataConfig(paths=[str(path)], cell_set_len=8, min_cells=3, **kw)


def test_features_from_obsm_leave_x_on_disk(tmp_path):
    # an embedded file usually keeps its gene counts in X, the largest part of it: reading the
    # features from obsm must not load X (here X is made unreadable; reading it would fail)
    import h5py

    embedded = make_adata()
    counts = sp.random(embedded.n_obs, 30, density=0.1, format="csr", dtype=np.float32, rng=0)
    adata = anndata.AnnData(X=counts, obs=embedded.obs, obsm=dict(embedded.obsm))
    path = write(adata, tmp_path)
    with h5py.File(path, "a") as f:
        del f["X/indptr"]
    with pytest.raises(KeyError):
        anndata.read_h5ad(path)
    table = load_cells(cfg_for(path))
    np.testing.assert_array_equal(table.features, adata.obsm["X_state"])


def test_groups_and_control_matching(tmp_path):
    data = CellSetData(cfg_for(write(make_adata(), tmp_path)), seed=0)
    assert data.table.pert_names == ["burn", "sham"]
    names = [g.name for g in data.groups["train"]]
    assert names == ["fib | 10 | burn", "fib | 14 | burn", "mac | 10 | burn", "mac | 14 | burn"]
    for g in data.groups["train"]:
        t = data.table
        assert (t.pert[g.controls] == "sham").all() and (
            t.cell_type[g.controls] == g.cell_type
        ).all()
        assert (t.timepoint[g.controls] == g.timepoint).all()
        assert (data.split[g.cells] == "train").all() and (data.split[g.controls] == "train").all()


def test_missing_timepoint_controls_fall_back_with_a_warning(tmp_path, caplog):
    path = write(make_adata({("mac", 14, "sham"): 0}), tmp_path)
    with caplog.at_level(logging.WARNING, logger="st_finetune"):
        data = CellSetData(cfg_for(path), seed=0)
    group = next(g for g in data.groups["train"] if g.name == "mac | 14 | burn")
    assert group.controls_fallback
    assert (data.table.timepoint[group.controls] == "10").all()
    assert "group 'mac | 14 | burn'" in caplog.text


def test_small_groups_are_resampled_and_tiny_ones_reported(tmp_path):
    path = write(make_adata({("fib", 14, "burn"): 4, ("mac", 10, "burn"): 1}), tmp_path)
    data = CellSetData(cfg_for(path, val_fraction=0.0, test_fraction=0.0), seed=0)
    small = next(i for i, g in enumerate(data.groups["train"]) if g.name == "fib | 14 | burn")
    dataset = data.sets("train")
    item = next(dataset[i] for i in range(len(dataset)) if dataset.sets[i][0] == small)
    assert item["pert_cell_emb"].shape == (8, 6)  # 4 cells drawn with replacement
    assert any("mac | 10 | burn" in msg for msg in data.report)


def test_control_sets_option(tmp_path):
    data = CellSetData(cfg_for(write(make_adata(), tmp_path), control_sets=True), seed=0)
    assert any(g.pert == "sham" for g in data.groups["train"])


def test_one_hot_in_sorted_order_and_batch_layout(tmp_path):
    data = CellSetData(cfg_for(write(make_adata(), tmp_path)), seed=0)
    batch = next(iter(data.loader("train", batch_size=3)))
    assert batch["pert_emb"].shape == (24, 2) and batch["ctrl_cell_emb"].shape == (24, 6)
    assert (batch["pert_emb"][:, 0] == 1).all()  # 'burn' sorts before 'sham'


def test_a_batch_is_its_sets_stacked(tmp_path):
    # the loader gathers a batch at once (CellSetDataset.__getitems__): the sets as defined (the
    # drawn control and target cells' features, the perturbation's one-hot row), stacked in order
    data = CellSetData(cfg_for(write(make_adata(), tmp_path)), seed=0)
    dataset = data.sets("train")
    batch = next(iter(data.loader("train", batch_size=3)))
    features = torch.from_numpy(data.table.features)
    items = []
    for group, ctrl, target in dataset.sets[:3]:
        onehot = torch.zeros(len(ctrl), len(data.table.pert_names))
        onehot[:, data.table.pert_index(dataset.groups[group].pert)] = 1
        items.append({"pert_emb": onehot, "ctrl_cell_emb": features[ctrl],
                      "pert_cell_emb": features[target], "group": torch.tensor(group)})  # fmt: skip
    for key, value in batch.items():
        expected = torch.stack if key == "group" else torch.cat
        assert torch.equal(value, expected([it[key] for it in items])), key
        assert torch.equal(dataset[0][key], items[0][key]), key  # one set alone
    assert batch["pert_emb"].dtype == torch.float32 and batch["group"].dtype == torch.int64
    in_workers = next(iter(data.loader("train", batch_size=3, num_workers=2)))
    assert all(torch.equal(in_workers[key], batch[key]) for key in batch)


def test_splits_are_reproducible_and_stratified(tmp_path):
    table = load_cells(cfg_for(write(make_adata(), tmp_path)))
    cfg = cfg_for("x")
    a, b, c = make_splits(table, cfg, 0), make_splits(table, cfg, 0), make_splits(table, cfg, 1)
    assert (a == b).all() and (a != c).any()
    assert set(a) == {"train", "val", "test"}
    frame = pd.DataFrame({"g": table.cell_type + table.timepoint + table.pert, "s": a})
    assert (frame.groupby("g")["s"].apply(lambda s: (s == "test").sum()) == 4).all()


def test_training_sets_change_with_the_epoch_and_evaluation_sets_do_not(tmp_path):
    data = CellSetData(cfg_for(write(make_adata(), tmp_path)), seed=0)
    first = [s[2].tolist() for s in data.sets("train", 0).sets]
    again = [s[2].tolist() for s in data.sets("train", 0).sets]
    second = [s[2].tolist() for s in data.sets("train", 1).sets]
    assert first == again and first != second
    assert [s[2].tolist() for s in data.sets("test", 0).sets] == [
        s[2].tolist() for s in data.sets("test", 5).sets
    ]


def test_group_holdout(tmp_path):
    cfg = cfg_for(write(make_adata(), tmp_path), split="groups", holdout_key="timepoint",
                  holdout_values=[14])  # fmt: skip
    data = CellSetData(cfg, seed=0)
    assert {g.timepoint for g in data.groups["test"]} == {"14"}
    assert {g.timepoint for g in data.groups["train"]} == {"10"}


def test_sparse_x_and_folder_of_files(tmp_path):
    a, b = (anndata.AnnData(X=sp.csr_matrix(ad.obsm["X_state"]), obs=ad.obs)
            for ad in (make_adata(seed=0), make_adata(seed=1)))  # fmt: skip
    (tmp_path / "folder").mkdir()
    write(a, tmp_path / "folder", "a.h5ad")
    write(b, tmp_path / "folder", "b.h5ad")
    table = load_cells(cfg_for(tmp_path / "folder", embed_key="X"))
    assert table.features.shape == (320, 6) and len(set(table.obs_names)) == 320


@pytest.mark.parametrize(
    "change,kw,match",
    [
        (None, {"pert_col": "treatment"}, r"no column 'treatment'.*available: \['condition'"),
        (None, {"embed_key": "X_pca"}, r"obsm has no 'X_pca'.*available: \['X_state'\]"),
        (None, {"control_pert": "ctrl"}, r"control label 'ctrl'.*labels found: \['burn', 'sham'\]"),
        ("float_timepoint", {}, "continuous numbers"),
        ("empty_celltype", {}, "is empty"),
        ("nan_features", {}, r"2 cells have NaN or Inf.*\['c0', 'c5'\]"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, change, kw, match):
    adata = make_adata()
    if change == "float_timepoint":
        adata.obs["timepoint"] = adata.obs["timepoint"] + 0.5
    if change == "empty_celltype":
        adata.obs["cell_type"] = np.nan
    if change == "nan_features":
        adata.obsm["X_state"][[0, 5], 1] = np.nan
    with pytest.raises(DataError, match=match):
        CellSetData(cfg_for(write(adata, tmp_path), **kw), seed=0)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cells(cfg_for(tmp_path / "nope.h5ad"))
