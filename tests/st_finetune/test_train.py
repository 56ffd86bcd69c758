"""The main job end to end on small data: run folder, protection, exact resume, DDP, the demo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from st_finetune.config import load_config
from st_finetune.demo import make_wound_study
from st_finetune.model import write_model_folder
from st_finetune.train import main, run

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    study = make_wound_study(base / "study.h5ad")
    model = tiny_model(input_dim=64, output_dim=64, embed_key="X_state")
    folder = write_model_folder(model, base / "st", ["drugA", "drugB", "drugC", "drugD", "DMSO"])
    return study, folder


def overrides(inputs, out, **extra):
    study, folder = inputs
    args = {
        "name": "tiny", "output_dir": str(out), "data.paths": str(study),
        "model.checkpoint": str(folder), "data.cell_set_len": 16, "training.batch_size": 8,
        "training.max_epochs": 2, "training.lr": 1e-3, "training.warmup_steps": 5,
        "mhc.enable": True, "mhc.n_streams": 2, "mhc.sinkhorn_iters": 5, "lora.r": 4,
        "trainer.accelerator": "cpu", "trainer.progress_bar": False,
    }  # fmt: skip
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def test_run_writes_a_complete_run_folder(inputs, tmp_path):
    summary = run(load_config(None, overrides(inputs, tmp_path)))
    run_dir = tmp_path / "tiny"
    for name in ("config.yaml", "splits.csv", "metrics.csv", "summary.json", "loss.png",
                 "grad_norm.png", "train.log", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
                 "adapter/manifest.json", "adapter/extra_state.pt"):  # fmt: skip
        assert (run_dir / name).exists(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    train = metrics[metrics["split"] == "train"]
    assert list(train["step"]) == list(range(1, summary["steps"] + 1))
    assert train["grad_norm"].notna().all() and (train["cells_per_s"] > 0).all()
    assert (metrics["split"] == "val").sum() == 2
    assert summary["rebuilt_heads"] == ["pert_encoder"]
    assert 0 < summary["parameters"]["percent"] < 100
    splits = pd.read_csv(run_dir / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}


def test_results_are_never_overwritten_unless_asked(inputs, tmp_path, capsys):
    args = overrides(inputs, tmp_path, **{"training.max_epochs": 1})
    assert main(args) == 0
    assert main(args) == 1
    assert "already holds results" in capsys.readouterr().err
    assert main([*args, "overwrite=true"]) == 0


def test_resume_continues_exactly(inputs, tmp_path):
    straight = run(
        load_config(None, overrides(inputs, tmp_path / "a", **{"training.max_epochs": 3}))
    )
    run(load_config(None, overrides(inputs, tmp_path / "b", **{"training.max_epochs": 2})))
    resumed = run(load_config(None, overrides(inputs, tmp_path / "b", resume=True,
                                              **{"training.max_epochs": 3})))  # fmt: skip
    a = pd.read_csv(tmp_path / "a" / "tiny" / "metrics.csv")
    b = pd.read_csv(tmp_path / "b" / "tiny" / "metrics.csv")
    assert resumed["steps"] == straight["steps"]
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=1e-6)
    assert resumed["parameter_checksum"] == straight["parameter_checksum"]


def test_resume_refuses_changed_settings(inputs, tmp_path, capsys):
    assert main(overrides(inputs, tmp_path, **{"training.max_epochs": 1})) == 0
    assert main(overrides(inputs, tmp_path, resume=True, **{"lora.r": 8})) == 1
    assert "lora.r" in capsys.readouterr().err


def test_bad_data_fails_before_training(inputs, tmp_path, capsys):
    assert main(overrides(inputs, tmp_path, **{"data.pert_col": "treatment"})) == 1
    err = capsys.readouterr().err
    assert "no column 'treatment'" in err and "condition" in err
    assert not (tmp_path / "tiny" / "metrics.csv").exists()


def _cli(args, timeout):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "st_finetune.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_two_cpu_processes_with_ddp_agree(inputs, tmp_path):
    done = _cli(overrides(inputs, tmp_path, **{"trainer.devices": 2, "trainer.strategy": "ddp",
                                               "training.max_epochs": 1}), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] is True


def test_demo_fine_tuned_beats_pretrained(tmp_path):
    done = _cli(["configs/demo.yaml", f"output_dir={tmp_path}",
                 f"data.paths={tmp_path}/wound_healing.h5ad",
                 f"model.checkpoint={tmp_path}/st_pretrained"], timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["heldout_energy_finetuned"] < summary["heldout_energy_pretrained"]
    assert "held-out energy distance" in done.stdout
