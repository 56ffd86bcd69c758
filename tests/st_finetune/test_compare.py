"""Training (or reusing) variants and comparing them, with one seed or several."""

from pathlib import Path

import pandas as pd
import pytest

from st_finetune.compare import compare, main, read_comparison, variant_config

from .conftest import overrides

CONFIGS = Path(__file__).parents[2] / "configs"


def comparison(inputs, tmp_path, extra: str = "", **variants) -> Path:
    """A comparison file over the tiny inputs (1 epoch), with ``extra`` lines added."""
    base = tmp_path / "base.yaml"
    base.write_text("\n".join(f"{a.split('=', 1)[0]}: {a.split('=', 1)[1]}"
                              for a in overrides(inputs, tmp_path) if "." not in a.split("=")[0]))  # fmt: skip
    dotted = [a for a in overrides(inputs, tmp_path, **{"training.max_epochs": 1})
              if "." in a.split("=")[0]]  # fmt: skip
    variants = variants or {"st_lora": ["mhc.enable=false"], "st_lora_mhc": ["mhc.enable=true"]}
    spec = tmp_path / "compare.yaml"
    spec.write_text(
        f"title: tiny\nbase: {base}\noutput_dir: {tmp_path / 'cmp'}\noverrides: {dotted}\n{extra}"
        "variants:\n" + "".join(f"  {name}: {value}\n" for name, value in variants.items())
    )
    return spec


def test_comparison_report_and_reuse(inputs, tmp_path, capsys):
    spec = comparison(inputs, tmp_path)
    report = compare(spec)
    text = report.read_text()
    for heading in ("## Summary", "## What the numbers say", "## By cell type",
                    "## Metric definitions", "| no change |", "| st_lora_mhc |"):  # fmt: skip
        assert heading in text
    assert "±" not in text and "within a single seed." in text
    assert text.index("### macrophage") < text.index("### fibroblast") < text.index("### T cell")
    for name in ("results.csv", "loss.png", "grad_norm.png", "energy_by_cell_type.png",
                 "shift_trajectories.png", "cells.png"):  # fmt: skip
        assert (tmp_path / "cmp" / name).is_file(), name
    results = pd.read_csv(tmp_path / "cmp" / "results.csv")
    assert set(results["variant"]) == {"st_lora", "st_lora_mhc", "pretrained", "no change",
                                       "mean shift"}  # fmt: skip
    assert set(results["seed"]) == {0}  # the base config's seed
    stamp = (tmp_path / "cmp" / "runs" / "st_lora" / "summary.json").stat().st_mtime
    capsys.readouterr()
    compare(spec)
    assert "reusing the finished run" in capsys.readouterr().err
    assert (tmp_path / "cmp" / "runs" / "st_lora" / "summary.json").stat().st_mtime == stamp


def test_seeds_replicate_every_variant_on_its_own_split(inputs, tmp_path, capsys):
    spec = comparison(inputs, tmp_path)
    assert main([str(spec), "--seeds", "3", "4"]) == 0
    runs = tmp_path / "cmp" / "runs"
    for seed in (3, 4):
        for variant in ("st_lora", "st_lora_mhc"):
            assert (runs / f"seed{seed}" / variant / "summary.json").is_file()
    splits = [pd.read_csv(runs / f"seed{s}" / v / "splits.csv")["split"]
              for s in (3, 4) for v in ("st_lora", "st_lora_mhc")]  # fmt: skip
    assert splits[0].equals(splits[1]) and splits[2].equals(splits[3])  # shared within a seed
    assert not splits[0].equals(splits[2])  # each seed draws its own
    results = pd.read_csv(tmp_path / "cmp" / "results.csv")
    per_seed = results[results["group"] == "overall"].groupby("seed")["variant"].unique()
    for seed in (3, 4):  # baselines and the pretrained model scored on each seed's split
        assert set(per_seed[seed]) == {"st_lora", "st_lora_mhc", "pretrained", "no change",
                                       "mean shift"}  # fmt: skip
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "trained with seeds 3, 4" in text and " ± " in text and "Held-out cells (seed 3)" in text
    assert "in every seed arises by chance with probability 0.5" in text
    assert "`st_lora` (" + str(runs / "seed3" / "st_lora") in text


@pytest.mark.parametrize(
    ("extra", "variants", "message"),
    [
        ("seeds: [0, 0]\n", {}, "repeats a seed"),
        ("seeds: [zero]\n", {}, "must be a list of integers"),
        ("", {"a": "[training.seed=1]", "b": "[training.seed=2]"}, "different seeds"),
    ],
)
def test_bad_seeds_stop_before_training(inputs, tmp_path, capsys, extra, variants, message):
    assert main([str(comparison(inputs, tmp_path, extra, **variants))]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "runs").exists()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("compare*.yaml")), ids=lambda p: p.name)
def test_shipped_comparisons_resolve(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # their base config is named from the repository root
    spec = read_comparison(path)
    for seed in spec["seeds"] or [None]:
        for name in spec["variants"]:
            cfg = variant_config(spec, name, [], seed)
            assert cfg.name == name and (seed is None or cfg.training.seed == seed)
