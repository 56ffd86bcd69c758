"""The demo files: created when missing, an outdated demo study renewed, the user's files kept."""

import anndata
import numpy as np
import pytest

from st_finetune.demo import ensure_demo_files, make_wound_study


def test_a_users_file_at_the_demo_path_is_never_touched(tmp_path):
    study = anndata.read_h5ad(make_wound_study(tmp_path / "demo.h5ad"))
    mine = anndata.AnnData(obs=study.obs, obsm={"X_state": study.obsm["X_state"]})  # no genes
    mine.write_h5ad(tmp_path / "mine.h5ad")
    before = (tmp_path / "mine.h5ad").read_bytes()
    ensure_demo_files(tmp_path / "mine.h5ad", None)
    assert (tmp_path / "mine.h5ad").read_bytes() == before
    (tmp_path / "notes.txt").write_text("not hdf5")
    ensure_demo_files(tmp_path / "notes.txt", None)  # neither of these is the demo's
    ensure_demo_files(tmp_path, None)
    assert (tmp_path / "notes.txt").read_text() == "not hdf5"


def test_a_demo_study_without_genes_is_written_again_with_the_same_cells(tmp_path):
    study = anndata.read_h5ad(make_wound_study(tmp_path / "demo.h5ad"))
    old = anndata.AnnData(
        obs=study.obs,
        obsm={"X_state": study.obsm["X_state"]},
        uns={"planted": dict(study.uns["planted"])},
    )  # an earlier version's
    old.write_h5ad(tmp_path / "old.h5ad")
    ensure_demo_files(tmp_path / "old.h5ad", None)
    renewed = anndata.read_h5ad(tmp_path / "old.h5ad")
    assert renewed.n_vars == study.n_vars == 200
    np.testing.assert_array_equal(renewed.obsm["X_state"], study.obsm["X_state"])
    ensure_demo_files(tmp_path / "missing" / "wound_healing.h5ad", None)
    assert (tmp_path / "missing" / "wound_healing.h5ad").is_file()


def test_no_synthetic_stand_in_at_a_missing_path_of_the_users(tmp_path):
    """demo.yaml with the user's own (mistyped) file or checkpoint: an error naming the path, not
    the demo's synthetic study or model trained there as if it were theirs."""
    with pytest.raises(FileNotFoundError, match=r"data.paths: .*my_stduy.h5ad does not exist"):
        ensure_demo_files(tmp_path / "my_stduy.h5ad", None)
    with pytest.raises(FileNotFoundError, match=r"model.checkpoint: .*ST-Tahoe does not exist"):
        ensure_demo_files(None, tmp_path / "ST-Tahoe")
    assert not any(tmp_path.iterdir())
