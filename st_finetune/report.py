"""The comparison report: ``results.csv``, ``report.md`` and its plots, for a biologist to read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as M
from .evaluate import BASELINES, MEAN_SHIFT, NO_CHANGE, PRETRAINED
from .plots import _pyplot, read_metrics, training_curves

HEADLINE = ("energy_distance", "nn_distance_norm", "pearson_delta", "mae_mean", "discrimination",
            "temporal_coherence")  # fmt: skip
STABILITY = ("loss_spikes", "grad_norm_median", "grad_norm_p99", "grad_norm_max", "grad_norm_cv",
             "clipped_fraction")  # fmt: skip
EFFICIENCY = ("trainable_params", "trainable_percent", "seconds_per_epoch", "peak_memory_mb")
FIRST_CELL_TYPES = ("macrophage", "fibroblast")


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def markdown_table(table: pd.DataFrame, bold_best: bool = True) -> str:
    """Variants as rows, metrics as columns; the best value of each metric in bold."""
    cols = list(table.columns)
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    best = {}
    if bold_best:
        for c in cols:
            values = table[c].dropna()
            if c in HEADLINE and len(values):
                best[c] = values.min() if c in M.LOWER_IS_BETTER else values.max()
    for variant, row in table.iterrows():
        cells = []
        for c in cols:
            text = _fmt(row[c])
            cells.append(f"**{text}**" if c in best and row[c] == best[c] else text)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(variants, trained):
    baselines = [v for v in (NO_CHANGE, MEAN_SHIFT, PRETRAINED) if v in variants]
    return baselines + [v for v in trained if v in variants]


def cell_type_order(cell_types) -> list[str]:
    first = [c for c in FIRST_CELL_TYPES if c in cell_types]
    return first + sorted(c for c in cell_types if c not in first)


def hypotheses(results: pd.DataFrame, trained: list[str]) -> list[str]:
    """The seed's four hypotheses, each judged against the numbers, without overstating."""
    overall = results[results["group"] == "overall"].pivot_table(
        index="variant", columns="metric", values="value"
    )
    lines = []

    def get(variant, metric):
        try:
            return float(overall.loc[variant, metric])
        except KeyError:
            return float("nan")

    lora = next((v for v in trained if "mhc" not in v.lower()), None)
    mhc = next((v for v in trained if "mhc" in v.lower()), None)
    ed = {v: get(v, "energy_distance") for v in [*trained, PRETRAINED, *BASELINES]}
    for name in trained:
        beats_pre = ed[name] < ed.get(PRETRAINED, float("inf"))
        beats_base = all(ed[name] < ed[b] for b in BASELINES if not math.isnan(ed[b]))
        lines.append(
            f"- **Fine-tuning improves over the pretrained model** ({name}): "
            f"{'supported' if beats_pre else 'not supported'} on held-out energy distance "
            f"({_fmt(ed[name])} vs {_fmt(ed.get(PRETRAINED))}); it "
            f"{'beats' if beats_base else 'does not beat'} both honest baselines "
            f"(no change {_fmt(ed[NO_CHANGE])}, mean shift {_fmt(ed[MEAN_SHIFT])})."
        )
    if lora and mhc:
        cv_l, cv_m = get(lora, "grad_norm_cv"), get(mhc, "grad_norm_cv")
        sp_l, sp_m = get(lora, "loss_spikes"), get(mhc, "loss_spikes")
        p99_l, p99_m = get(lora, "grad_norm_p99"), get(mhc, "grad_norm_p99")
        if cv_m < 0.9 * cv_l and sp_m <= sp_l:
            verdict = "consistent with"
        elif cv_m > 1.1 * cv_l or sp_m > sp_l:
            verdict = "contradicted by"
        else:
            verdict = "not shown by (no meaningful difference in)"
        lines.append(
            f"- **mHC stabilises training**: {verdict} this run: gradient-norm CV {_fmt(cv_m)} "
            f"({mhc}) vs {_fmt(cv_l)} ({lora}), loss spikes {_fmt(sp_m)} vs {_fmt(sp_l)}, p99 "
            f"{_fmt(p99_m)} vs {_fmt(p99_l)}. One seed and one short run: even a clear difference "
            "here is not evidence of a general effect."
        )
        if ed[mhc] < 0.98 * ed[lora]:
            verdict = "supported"
        elif ed[mhc] > 1.02 * ed[lora]:
            verdict = "not supported (mHC is worse)"
        else:
            verdict = "not supported: no meaningful difference (within 2%)"
        lines.append(
            f"- **mHC improves final performance**: {verdict} here (energy distance "
            f"{_fmt(ed[mhc])} with mHC vs {_fmt(ed[lora])} without), within a single seed."
        )
    pct = {v: get(v, "trainable_percent") for v in trained}
    efficient = all(p < 5 for p in pct.values())
    lines.append(
        "- **Parameter efficiency (95%+ frozen)**: "
        + ", ".join(f"{v}: {_fmt(p)}% trainable" for v, p in pct.items())
        + (". Supported." if efficient else ". Not met here: rebuilt heads (new perturbation "
           "vocabulary or feature space) are trained in full, and mHC adds n*C x (n^2 + 2n) "
           "coefficients per site; both weigh heavily in a small model, far less in ST-Tahoe.")
    )  # fmt: skip
    return lines


def plot_cell_type_bars(results: pd.DataFrame, variants: list[str], metric: str, path: Path):
    plt = _pyplot()
    groups = results[(results["metric"] == metric) & (results["group"] != "overall")]
    table = groups.groupby(["cell_type", "variant"])["value"].mean().unstack("variant")
    table = table.reindex(index=cell_type_order(table.index), columns=variants)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(table.index))
    for i, variant in enumerate(variants):
        ax.bar(x + i * width, table[variant], width, label=variant)
    ax.set_xticks(x + 0.4 - width / 2, table.index, rotation=20)
    ax.set(ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')} by cell type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_shift_trajectories(shifts: pd.DataFrame, path: Path):
    """``shifts``: columns cell_type, timepoint, variant, shift (projection on the observed shift)."""
    plt = _pyplot()
    cell_types = cell_type_order(shifts["cell_type"].unique())
    cols = min(3, len(cell_types))
    rows = math.ceil(len(cell_types) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, ct in zip(axes.flat, cell_types, strict=False):
        sub = shifts[shifts["cell_type"] == ct]
        for variant, frame in sub.groupby("variant", sort=False):
            frame = frame.sort_values("day")
            style = "k-o" if variant == "observed" else "--o"
            ax.plot(frame["day"], frame["shift"], style, label=variant, ms=3)
        ax.set(title=ct, xlabel="timepoint", ylabel="|shift| along observed")
    for ax in list(axes.flat)[len(cell_types) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, results: pd.DataFrame, run_dirs: dict[str, Path],
                 shifts: pd.DataFrame, title: str) -> Path:  # fmt: skip
    """``results.csv``, the plots and ``report.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results.to_csv(out_dir / "results.csv", index=False)
    trained = list(run_dirs)
    variants = _order(results["variant"].unique(), trained)
    overall = results[results["group"] == "overall"].pivot_table(
        index="variant", columns="metric", values="value", sort=False
    )
    head = overall.reindex(index=variants, columns=[m for m in HEADLINE if m in overall.columns])
    train_table = overall.reindex(index=trained, columns=[*STABILITY, *EFFICIENCY])
    training_curves({n: read_metrics(d / "metrics.csv") for n, d in run_dirs.items()}, out_dir)
    plot_cell_type_bars(results, variants, "energy_distance", out_dir / "energy_by_cell_type.png")
    plot_shift_trajectories(shifts, out_dir / "shift_trajectories.png")

    lines = [f"# {title}", "",
             "Held-out cells of every (cell type, timepoint) group; each prediction starts from the "
             "group's own control cells. Baselines: *no change* (the controls as prediction), "
             "*mean shift* (controls plus the training split's mean shift of the same cell type and "
             "timepoint) and *pretrained* (the model before fine-tuning).", "",
             "## Summary (mean over groups; best in bold)", "", markdown_table(head), "",
             "## What the numbers say about the seed's hypotheses", "",
             *hypotheses(results, trained), "",
             "## Training stability and efficiency", "", markdown_table(train_table, False), "",
             "![loss](loss.png) ![gradient norm](grad_norm.png)", "",
             "## By cell type", ""]  # fmt: skip
    groups = results[(results["group"] != "overall") & (results["metric"].isin(HEADLINE))]
    for ct in cell_type_order(groups["cell_type"].unique()):
        sub = groups[groups["cell_type"] == ct]
        table = sub.pivot_table(index="variant", columns="metric", values="value", aggfunc="mean")
        table = table.reindex(index=variants, columns=[m for m in HEADLINE if m in table.columns])
        lines += [f"### {ct}", "", markdown_table(table), ""]
    lines += ["![energy distance by cell type](energy_by_cell_type.png)", "",
              "![predicted vs observed shifts over time](shift_trajectories.png)", "",
              "## Metric definitions", ""]  # fmt: skip
    lines += [f"- **{k}**: {v}" for k, v in {**M.DEFINITIONS, **M.STABILITY_DEFINITIONS}.items()]
    lines += ["", "Runs: " + ", ".join(f"`{n}` ({d})" for n, d in run_dirs.items()), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
