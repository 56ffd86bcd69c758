"""The comparison report's judgements and tables, on results made up for each case."""

import numpy as np
import pandas as pd
import pytest

from st_finetune.config import DataConfig
from st_finetune.report import (
    by_seed,
    hypotheses,
    markdown_table,
    over_seeds,
    plot_shift_trajectories,
    what_is_scored,
)

TRAINED = ["st_lora", "st_lora_mhc"]


def results(energy: dict[str, list[float]], cv=(0.5, 0.5), spikes=(3, 3)) -> pd.DataFrame:
    """Overall rows: ``energy`` maps a variant to its energy distance in each seed; the two
    trained variants get gradient-norm CV and loss spikes ``(lora, mhc)`` in every seed."""
    rows = []
    for variant, values in energy.items():
        for seed, value in enumerate(values):
            metrics = {"energy_distance": value}
            if variant in TRAINED:
                i = TRAINED.index(variant)
                metrics |= {"grad_norm_cv": cv[i], "loss_spikes": spikes[i],
                            "grad_norm_p99": 1.0, "trainable_percent": 2.0}  # fmt: skip
            rows += [{"variant": variant, "group": "overall", "metric": m, "value": v,
                      "cell_type": "", "timepoint": "", "seed": seed}
                     for m, v in metrics.items()]  # fmt: skip
    return pd.DataFrame(rows)


def energies(lora, mhc, pretrained=None):
    n = len(lora)
    return {"no change": [0.9] * n, "mean shift": [0.8] * n,
            "pretrained": pretrained or [0.7] * n, "st_lora": lora, "st_lora_mhc": mhc}  # fmt: skip


def line(lines, start):
    return next(text for text in lines if text.startswith(start))


def test_one_seed_is_judged_as_one_run():
    frame = results(energies([0.60], [0.50])).drop(columns="seed")
    lines = hypotheses(frame, TRAINED)
    assert "**mHC improves final performance**: supported here" in line(lines, "- **mHC improves")
    assert "within a single seed." in line(lines, "- **mHC improves")
    assert "One seed and one short run" in line(lines, "- **mHC stabilises")
    assert "supported on held-out energy distance (0.600 vs 0.700)" in lines[0]


def test_a_difference_must_hold_in_every_seed():
    better = hypotheses(results(energies([0.60, 0.62, 0.61], [0.55, 0.57, 0.56])), TRAINED)
    text = line(better, "- **mHC improves")
    assert ": supported here" in text and "per seed -8.3%, -8.1%, -8.2%" in text
    assert "probability 0.25" in text  # one sign in all of 3 seeds by chance
    mixed = hypotheses(results(energies([0.60, 0.62, 0.61], [0.55, 0.65, 0.56])), TRAINED)
    assert "not supported: the difference is within 2% or changes sign between seeds" in line(
        mixed, "- **mHC improves"
    )
    worse = hypotheses(results(energies([0.50, 0.50], [0.60, 0.55])), TRAINED)
    assert "not supported (mHC is worse)" in line(worse, "- **mHC improves")


def test_fine_tuning_against_the_pretrained_model_seed_by_seed():
    lines = hypotheses(results(energies([0.6, 0.8], [0.6, 0.6], pretrained=[0.7, 0.7])), TRAINED)
    assert (
        "(st_lora): mixed (in 1 of 2 seeds) on held-out energy distance (0.700 vs 0.700)"
        in (lines[0])
    )
    assert "(st_lora_mhc): supported (in 2 of 2 seeds)" in lines[1]
    assert "beats both honest baselines in 2 of 2 seeds" in lines[1]


def test_stability_is_consistent_only_when_every_seed_agrees():
    steady = hypotheses(results(energies([0.6] * 3, [0.6] * 3), cv=(0.5, 0.3)), TRAINED)
    assert "consistent with these runs (consistent in 3 of 3 seeds" in line(steady, "- **mHC stab")
    frame = results(energies([0.6] * 3, [0.6] * 3), cv=(0.5, 0.3))
    frame.loc[(frame["seed"] == 2) & (frame["metric"] == "loss_spikes")
              & (frame["variant"] == "st_lora_mhc"), "value"] = 9  # fmt: skip
    text = line(hypotheses(frame, TRAINED), "- **mHC stab")
    assert text.startswith("- **mHC stabilises training**: not shown by")
    assert "consistent in 2 of 3 seeds, contradicted in 1 of 3 seeds" in text


def test_tables_give_the_mean_and_spread_over_seeds():
    frame = results(energies([0.60, 0.64], [0.50, 0.52]))
    mean, sd = over_seeds(by_seed(frame), ["st_lora", "st_lora_mhc"], ["energy_distance"])
    assert np.allclose(mean["energy_distance"], [0.62, 0.51])
    table = markdown_table(mean, spread=sd)
    assert "| st_lora | 0.620 ± 0.028 |" in table
    assert "| st_lora_mhc | **0.510** ± 0.014 |" in table
    one = results(energies([0.60], [0.50]))
    mean, sd = over_seeds(by_seed(one), ["st_lora"], ["energy_distance"])
    assert markdown_table(mean, spread=sd).endswith("| st_lora | **0.600** |")  # one seed: no ±
    mean, sd = over_seeds(by_seed(frame), TRAINED, ["trainable_percent"])  # the same every seed
    assert "| st_lora | 2 |" in markdown_table(mean, bold_best=False, spread=sd)


@pytest.mark.parametrize("labels", [("D7", "D14", "D21"), ("early", "mid", "late")])
def test_shift_plot_takes_timepoint_labels(tmp_path, labels):
    rows = [{"cell_type": ct, "pert": "burn", "timepoint": tp, "day": float(i), "variant": v,
             "shift": float(i), "seed": seed}
            for ct in ("macrophage", "fibroblast") for i, tp in enumerate(labels)
            for v in ("observed", "st_lora") for seed in (0, 1)]  # fmt: skip
    plot_shift_trajectories(pd.DataFrame(rows), tmp_path / "shift.png")
    assert (tmp_path / "shift.png").stat().st_size > 0


def test_the_opening_says_what_was_held_out():
    cells = what_is_scored(DataConfig())
    assert cells.startswith("Held-out cells of every (cell type, timepoint) group")
    day = what_is_scored(DataConfig(split="groups", holdout_key="timepoint", holdout_values=[19]))
    assert day.startswith("Every group whose timepoint is 19, held out of training entirely")
    assert "the same cell type's mean shift over the training timepoints" in day
    kind = what_is_scored(DataConfig(split="groups", holdout_key="cell_type",
                                     holdout_values=["T cell"]))  # fmt: skip
    assert "the perturbation's mean shift over all training groups" in kind


def test_gene_correlation_is_judged_against_the_design_documents_values():
    frame = results(energies([0.6, 0.6], [0.5, 0.5]))
    assert not any(text.startswith("- **Gene correlation") for text in hypotheses(frame, TRAINED))
    genes = {"pretrained": [0.5, 0.6], "mean shift": [0.4, 0.4], "st_lora": [0.7, 0.6],
             "st_lora_mhc": [0.75, 0.72], "decoded observed": [0.8, 0.9]}  # fmt: skip
    rows = [{"variant": v, "group": "overall", "metric": "pearson_delta_genes", "value": x,
             "cell_type": "", "timepoint": "", "seed": seed}
            for v, values in genes.items() for seed, x in enumerate(values)]  # fmt: skip
    text = line(hypotheses(pd.concat([frame, pd.DataFrame(rows)]), TRAINED), "- **Gene correl")
    assert "pretrained 0.550, st_lora 0.650 (expected > 0.65: not met)" in text  # not every seed
    assert "st_lora_mhc 0.735 (expected > 0.70: met); the mean-shift baseline 0.400" in text
    assert "predicting the observed cells' embeddings exactly would score 0.850" in text
