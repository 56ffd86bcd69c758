"""Scoring a run against its baselines."""

import logging
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from st_finetune import evaluate
from st_finetune.config import load_config
from st_finetune.data import DataError
from st_finetune.demo import make_wound_study
from st_finetune.evaluate import evaluate_run, main, score_cohort
from st_finetune.metrics import energy_distance
from st_finetune.train import run

from .conftest import overrides


def test_evaluation_scores_the_run_the_pretrained_model_and_both_baselines(tiny_run):
    frame = evaluate_run(tiny_run)
    assert list(frame.columns[:4]) == ["variant", "group", "metric", "value"]
    # "decoded observed": the reference for the gene metrics (the run has a gene decoder)
    assert set(frame["variant"]) == {"tiny", "pretrained", "no change", "mean shift",
                                     "decoded observed"}  # fmt: skip
    overall = frame[frame["group"] == "overall"].pivot_table(index="variant", columns="metric",
                                                             values="value")  # fmt: skip
    for metric in ("energy_distance", "nn_distance_norm", "pearson_delta", "mae_mean",
                   "discrimination", "temporal_coherence"):  # fmt: skip
        assert overall.loc["mean shift", metric] == overall.loc["mean shift", metric]  # not NaN
    # the controls drawn as inputs differ from the group's control mean only by sampling noise
    assert abs(overall.loc["no change", "pearson_delta"]) < 0.3
    for metric in ("loss_spikes", "grad_norm_p99", "trainable_percent", "seconds_per_epoch"):
        assert metric in overall.columns
    assert (tiny_run / "evaluation.csv").is_file()


def test_no_change_scores_the_control_inputs(tiny_run):
    from st_finetune.evaluate import load_run, predict_groups

    _, data, models = load_run(tiny_run)
    _, inputs = predict_groups(models["tiny"], data)
    frame = pd.read_csv(tiny_run / "evaluation.csv")
    group = data.groups["test"][0]
    expected = energy_distance(inputs[group.name], data.table.features[group.cells])
    row = frame[(frame["variant"] == "no change") & (frame["group"] == group.name)
                & (frame["metric"] == "energy_distance")]  # fmt: skip
    assert row["value"].item() == pytest.approx(expected)


def test_models_predict_sets_of_the_runs_length(tiny_run):
    # the run trained on sets of 16 cells, its base checkpoint on sets of 8: 16 rows must stay one
    # set (split in two, every prediction would change without an error)
    from st_finetune.evaluate import load_run

    _, data, models = load_run(tiny_run)
    assert data.cfg.cell_set_len == 16
    assert {name: m.config.cell_set_len for name, m in models.items()} == {
        "tiny": 16,
        "pretrained": 16,
    }


def test_a_run_without_a_base_checkpoint_is_evaluated(inputs, tmp_path):
    # LoRA + mHC on a new model: all of it trains, and its model.ckpt (LoRA merged, mHC recorded)
    # loads back
    summary = run(load_config(None, overrides(inputs, tmp_path, **{
        "model.checkpoint": "", "name": "scratch", "training.max_epochs": 1})))  # fmt: skip
    assert summary["parameters"]["percent"] == 100  # a new model trains in full
    frame = evaluate_run(tmp_path / "scratch")
    assert set(frame["variant"]) == {"scratch", "pretrained", "no change", "mean shift"}
    energy = frame[(frame["group"] == "overall") & (frame["metric"] == "energy_distance")]
    assert energy["value"].notna().all()


def test_the_readme_prediction_example_runs(tiny_run):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = readme.split("Predicting with a fine-tuned model")[1].split("```python")[1]
    scope: dict = {}
    exec(example.split("```")[0].replace("runs/demo", str(tiny_run)), scope)
    assert scope["predicted"].shape == (300, scope["manifest"]["input_dim"])
    assert scope["genes"].shape == (300, len(scope["decoder"].gene_names))


def test_evaluate_cli_errors_on_an_unfinished_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "not a finished run" in capsys.readouterr().err


def test_another_cohort_is_scored_beside_the_runs_baselines(tiny_run, tmp_path, capsys):
    cohort = make_wound_study(tmp_path / "cohort_b.h5ad", seed=1)  # new cells, same biology
    rows, predictions, data = score_cohort(tiny_run, [cohort])
    assert set(data.split) == {"test"} and not data.groups["train"]
    frame = pd.DataFrame(rows)
    assert set(frame["variant"]) == {"tiny", "pretrained", "no change", "mean shift",
                                     "decoded observed"}  # fmt: skip
    scored = set(frame.loc[frame["metric"] == "energy_distance", "group"]) - {"overall"}
    assert scored == {g.name for g in data.groups["test"]}
    for g in data.groups["test"]:  # no change: the cohort's own controls
        assert np.isin(predictions["no change"][g.name], data.table.features[g.controls]).all()
    assert main([str(tiny_run), "--data", str(cohort)]) == 0
    assert (tiny_run / "evaluation_cohort_b.csv").is_file()
    assert "energy_distance" in capsys.readouterr().out


def test_a_cohort_needs_the_models_perturbations(tiny_run, tmp_path):
    cohort = anndata.read_h5ad(make_wound_study(tmp_path / "b.h5ad", seed=1))
    cohort.obs["condition"] = cohort.obs["condition"].astype(str).replace("burn", "scald")
    cohort.write_h5ad(tmp_path / "scald.h5ad")
    with pytest.raises(DataError, match=r"\['scald'\] .* are not the model's"):
        score_cohort(tiny_run, [tmp_path / "scald.h5ad"])


def test_without_the_runs_data_a_cohort_has_no_mean_shift(tiny_run, tmp_path, monkeypatch, caplog):
    def unreadable(run_dir, cfg):
        raise DataError("data file gone.h5ad does not exist")

    monkeypatch.setattr(evaluate, "run_data", unreadable)
    with caplog.at_level(logging.WARNING, logger="st_finetune"):
        rows, _, _ = score_cohort(tiny_run, [make_wound_study(tmp_path / "b.h5ad", seed=1)])
    assert "mean shift" not in {r["variant"] for r in rows}
    assert "no mean-shift baseline" in caplog.text and "gone.h5ad" in caplog.text
    with pytest.raises(SystemExit):  # --split picks the run's own cells, --data other cells
        main([str(tiny_run), "--data", "b.h5ad", "--split", "val"])
