"""The main job end to end on small data: run folder, protection, exact resume, DDP, the demo."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import torch

from st_finetune.config import load_config
from st_finetune.model import load_finetuned
from st_finetune.model.adapt import is_lora_param, is_mhc_param
from st_finetune.train import heldout_change, main, run, training_precision

from .conftest import overrides

ROOT = Path(__file__).resolve().parents[2]


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
    # the training checkpoints hold what trains (the frozen weights are the base checkpoint's)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    model, _ = load_finetuned(run_dir / "adapter")
    trained = {f"model.{n}" for n, _ in model.named_parameters()
               if is_lora_param(n) or is_mhc_param(n) or n.startswith("pert_encoder.")}  # fmt: skip
    assert set(state) == trained
    assert sum(t.numel() for t in state.values()) == summary["parameters"]["trainable"]


def test_the_summary_weighs_the_held_out_change_by_group():
    """A mean can fall on one group alone: the summary says by how much, and in how many groups."""
    before, after = {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.4, "b": 1.1, "c": 1.2}
    summary = {"heldout_energy_pretrained": 1.0, "heldout_energy_finetuned": 0.9,
               "heldout_energy_groups": {"pretrained": before, "finetuned": after}}  # fmt: skip
    assert heldout_change(summary) == "-10.0%; lower in 1 of 3 groups"
    empty = {**summary, "heldout_energy_groups": {"pretrained": {}, "finetuned": {}}}
    assert heldout_change(empty) == "no test groups"


def test_precision_auto_is_mixed_on_gpus_with_or_without_bf16(monkeypatch):
    assert training_precision("auto", "auto") == "32-true"  # this machine: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert training_precision("auto", "auto") == "bf16-mixed"
    assert training_precision("auto", "cpu") == "32-true"
    assert training_precision("32-true", "gpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # V100, T4
    assert training_precision("auto", "gpu") == "16-mixed"


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(load_config(None, overrides(inputs, tmp_path / "b", resume=True,
                                                  **{"training.max_epochs": 3})))  # fmt: skip
    assert not [w for w in caught if "Checkpoint directory" in str(w.message)]  # it resumes them
    a = pd.read_csv(tmp_path / "a" / "tiny" / "metrics.csv")
    b = pd.read_csv(tmp_path / "b" / "tiny" / "metrics.csv")
    assert resumed["steps"] == straight["steps"]
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=1e-6)
    assert resumed["parameter_checksum"] == straight["parameter_checksum"]


def test_resume_refuses_another_base_checkpoint(inputs, tmp_path, capsys):
    # a resume loads the frozen weights from model.checkpoint again: a changed file is refused
    base = shutil.copytree(inputs[1], tmp_path / "base")
    args = overrides(inputs, tmp_path, **{"training.max_epochs": 1, "model.checkpoint": base})
    assert main(args) == 0
    ckpt = torch.load(base / "final.ckpt", weights_only=False)
    ckpt["state_dict"]["transformer_backbone.norm.weight"] += 1.0
    torch.save(ckpt, base / "final.ckpt")
    assert main([*args, "resume=true", "training.max_epochs=2"]) == 1
    assert "is not the base checkpoint this run started from" in capsys.readouterr().err


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


def test_demo_fine_tuned_beats_pretrained_and_both_baselines(tmp_path):
    from st_finetune.evaluate import evaluate_run

    done = _cli(["configs/demo.yaml", f"output_dir={tmp_path}",
                 f"data.paths={tmp_path}/wound_healing.h5ad",
                 f"model.checkpoint={tmp_path}/st_pretrained"], timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["heldout_energy_finetuned"] < summary["heldout_energy_pretrained"]
    assert "held-out energy distance of 64-cell sets as in training" in done.stdout
    for noise in ("litlogger", "LeafSpec", "is_gradient_checkpointing"):  # third parties' chatter
        assert noise not in done.stderr, noise
    results = evaluate_run(tmp_path / "demo")
    energy = results[(results["group"] == "overall") & (results["metric"] == "energy_distance")]
    energy = energy.set_index("variant")["value"]
    for other in ("pretrained", "no change", "mean shift"):
        assert energy["demo"] < energy[other], energy.to_dict()
