"""The comparison report: ``results.csv``, ``report.md`` and its plots, for a biologist to read."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import genes as G
from . import metrics as M
from .config import DataConfig
from .evaluate import BASELINES, DECODED_OBSERVED, MEAN_SHIFT, NO_CHANGE, PRETRAINED
from .plots import _pyplot, read_metrics, training_curves

HEADLINE = ("energy_distance", "nn_distance_norm", "pearson_delta", "mae_mean", "discrimination",
            "temporal_coherence", *G.GENE_DEFINITIONS)  # fmt: skip
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


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it (a report read elsewhere)."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def markdown_table(table: pd.DataFrame, bold_best: bool = True,
                   spread: pd.DataFrame | None = None) -> str:  # fmt: skip
    """Variants as rows, metrics as columns; the best value of each metric in bold; with
    ``spread`` (same shape: the standard deviation over seeds), ``mean ± sd`` where sd > 0."""
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
            text = f"**{text}**" if c in best and row[c] == best[c] else text
            sd = np.nan if spread is None else spread.loc[variant, c]
            cells.append(text if np.isnan(sd) or sd == 0 else f"{text} ± {_fmt(sd)}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_seed(results: pd.DataFrame, group: str = "overall") -> pd.DataFrame:
    """Rows ``(seed, variant)``, a column per metric: each seed's mean over the rows of
    ``group`` (``"overall"``, or a cell type's groups with ``group=None`` and filtered
    ``results``). Results without a ``seed`` column are one seed."""
    rows = results if group is None else results[results["group"] == group]
    rows = rows if "seed" in rows.columns else rows.assign(seed=0)
    return rows.pivot_table(index=["seed", "variant"], columns="metric", values="value",
                            aggfunc="mean", sort=False)  # fmt: skip


def over_seeds(table: pd.DataFrame, variants, metrics) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean and standard deviation over seeds of a :func:`by_seed` table (NaN sd: one seed)."""
    grouped = table.groupby(level="variant", sort=False)
    mean = grouped.mean().reindex(index=variants, columns=metrics)
    return mean, grouped.std().reindex(index=variants, columns=metrics)


def _order(variants, trained):
    baselines = [v for v in (NO_CHANGE, MEAN_SHIFT, PRETRAINED) if v in variants]
    return baselines + [v for v in trained if v in variants]


def cell_type_order(cell_types) -> list[str]:
    first = [c for c in FIRST_CELL_TYPES if c in cell_types]
    return first + sorted(c for c in cell_types if c not in first)


def _seeds_note(n: int) -> str:
    """What a difference of one sign in every seed is worth, said once per judgement."""
    if n == 1:
        return (
            "One seed and one short run: even a clear difference here is not evidence of a "
            "general effect."
        )
    return (f"With {n} seeds, one sign in every seed arises by chance with probability "
            f"{2.0 ** (1 - n):.2g}.")  # fmt: skip


def _share(flags: np.ndarray) -> str:
    return f"{int(flags.sum())} of {len(flags)} seeds"


def hypotheses(results: pd.DataFrame, trained: list[str]) -> list[str]:
    """The design document's four hypotheses, each judged against the numbers, without
    overstating. With several seeds each judgement is made seed by seed (the variants of a seed
    share their split) and holds only when it holds in every seed."""
    table = by_seed(results)
    seeds = list(dict.fromkeys(table.index.get_level_values("seed")))
    n = len(seeds)
    lines = []

    def get(variant, metric) -> np.ndarray:
        """``metric`` of ``variant`` in each seed (NaN where missing)."""
        if metric not in table.columns:
            return np.full(n, np.nan)
        return np.array([table[metric].get((seed, variant), np.nan) for seed in seeds], float)

    def mean(values: np.ndarray) -> str:
        return _fmt(float(np.nanmean(values)) if np.isfinite(values).any() else np.nan)

    lora = next((v for v in trained if "mhc" not in v.lower()), None)
    mhc = next((v for v in trained if "mhc" in v.lower()), None)
    ed = {v: get(v, "energy_distance") for v in [*trained, PRETRAINED, *BASELINES]}
    for name in trained:
        beats_pre = ed[name] < ed[PRETRAINED]
        beats_base = np.all([ed[name] < ed[b] for b in BASELINES if np.isfinite(ed[b]).all()],
                            axis=0)  # fmt: skip
        if n == 1:
            verdict = "supported" if beats_pre.all() else "not supported"
            base = ("beats" if beats_base.all() else "does not beat") + " both honest baselines"
        else:
            verdict = ("supported" if beats_pre.all() else "not supported" if not beats_pre.any()
                       else "mixed") + f" (in {_share(beats_pre)})"  # fmt: skip
            base = f"beats both honest baselines in {_share(beats_base)}"
        lines.append(
            f"- **Fine-tuning improves over the pretrained model** ({name}): {verdict} on held-out "
            f"energy distance ({mean(ed[name])} vs {mean(ed[PRETRAINED])}); it {base} "
            f"(no change {mean(ed[NO_CHANGE])}, mean shift {mean(ed[MEAN_SHIFT])})."
        )
    if lora and mhc:
        cv_l, cv_m = get(lora, "grad_norm_cv"), get(mhc, "grad_norm_cv")
        sp_l, sp_m = get(lora, "loss_spikes"), get(mhc, "loss_spikes")
        p99_l, p99_m = get(lora, "grad_norm_p99"), get(mhc, "grad_norm_p99")
        consistent = (cv_m < 0.9 * cv_l) & (sp_m <= sp_l)
        contradicted = (cv_m > 1.1 * cv_l) | (sp_m > sp_l)
        if consistent.all():
            verdict = "consistent with"
        elif contradicted.all():
            verdict = "contradicted by"
        else:
            verdict = "not shown by (no meaningful difference in)"
        runs = "this run" if n == 1 else (f"these runs (consistent in {_share(consistent)}, "
                                          f"contradicted in {_share(contradicted)})")  # fmt: skip
        lines.append(
            f"- **mHC stabilises training**: {verdict} {runs}: gradient-norm CV {mean(cv_m)} "
            f"({mhc}) vs {mean(cv_l)} ({lora}), loss spikes {mean(sp_m)} vs {mean(sp_l)}, p99 "
            f"{mean(p99_m)} vs {mean(p99_l)}{'' if n == 1 else ' (means over seeds)'}. "
            f"{_seeds_note(n)}"
        )
        change = ed[mhc] / ed[lora] - 1
        if (change < -0.02).all():
            verdict = "supported"
        elif (change > 0.02).all():
            verdict = "not supported (mHC is worse)"
        elif n == 1:
            verdict = "not supported: no meaningful difference (within 2%)"
        else:
            verdict = "not supported: the difference is within 2% or changes sign between seeds"
        where = (
            "within a single seed."
            if n == 1
            else ("per seed " + ", ".join(f"{c:+.1%}" for c in change) + f". {_seeds_note(n)}")
        )
        lines.append(
            f"- **mHC improves final performance**: {verdict} here (energy distance "
            f"{mean(ed[mhc])} with mHC vs {mean(ed[lora])} without), {where}"
        )
    genes = {v: get(v, "pearson_delta_genes")
             for v in [PRETRAINED, *trained, MEAN_SHIFT, DECODED_OBSERVED]}  # fmt: skip
    if np.isfinite(genes[PRETRAINED]).any():  # the runs decoded genes
        expected = {lora: 0.65, mhc: 0.70}  # the design document's expected results
        found = [f"{v} {mean(genes[v])}" + (f" (expected > {expected[v]:.2f}: "
                 + ("met" if (genes[v] > expected[v]).all() else "not met") + ")"
                 if v in expected else "") for v in [PRETRAINED, *trained]]  # fmt: skip
        lines.append(
            "- **Gene correlation** (the design document expects ~0.55 for the pretrained "
            "model, > 0.65 with LoRA, > 0.70 with LoRA + mHC; here the Pearson delta over the "
            "run's decoded genes, `pearson_delta_genes`): "
            + ", ".join(found)
            + f"; the mean-shift baseline {mean(genes[MEAN_SHIFT])}; predicting the observed "
            f"cells' embeddings exactly would score {mean(genes[DECODED_OBSERVED])} through this "
            "decoder (the decoder's errors and the noise of small held-out groups weigh on every "
            "prediction's score)."
        )
    pct = {v: float(np.nanmean(get(v, "trainable_percent"))) for v in trained}
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


def _cell_type_panels(plt, cell_types: list[str], height: float):
    """``(figure, one panel per cell type)``, three panels to a row, the spare ones hidden."""
    cols = min(3, len(cell_types))
    rows = math.ceil(len(cell_types) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[len(cell_types) :]:
        ax.axis("off")
    return fig, list(axes.flat)[: len(cell_types)]


def plot_shift_trajectories(shifts: pd.DataFrame, path: Path):
    """``shifts``: columns cell_type, timepoint, day, pert, variant, shift (projection on the
    observed shift) and optionally seed; several seeds are averaged."""
    plt = _pyplot()
    keys = [k for k in ("cell_type", "pert", "day", "timepoint", "variant") if k in shifts.columns]
    shifts = shifts.groupby(keys, sort=False)["shift"].mean().reset_index()
    cell_types = cell_type_order(shifts["cell_type"].unique())
    fig, panels = _cell_type_panels(plt, cell_types, 3)
    for ax, ct in zip(panels, cell_types, strict=True):
        sub = shifts[shifts["cell_type"] == ct]
        for variant, frame in sub.groupby("variant", sort=False):
            frame = frame.sort_values("day")
            style = "k-o" if variant == "observed" else "--o"
            ax.plot(frame["day"], frame["shift"], style, label=variant, ms=3)
        ticks = sub.drop_duplicates("day").sort_values("day")
        ax.set_xticks(ticks["day"], ticks["timepoint"])
        ax.set(title=ct, xlabel="timepoint", ylabel="|shift| along observed")
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cells(data, predictions: dict[str, dict], variants: list[str], path: Path,
               per_group: int = 150, seed: int = 0) -> None:  # fmt: skip
    """Held-out cells, one panel per cell type: the control inputs, the observed perturbed cells
    and each variant's predictions from those controls (``predictions``: variant -> group name
    -> ``(cells, features)``; up to ``per_group`` cells of each group and kind). x: position
    along the cell type's observed mean shift (perturbed minus control, its groups pooled), so
    the controls sit near 0 and the observed cells near the shift's size; y: the main direction
    of the remaining variation of the observed cells."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    groups, features = data.groups["test"], data.table.features
    cell_types = cell_type_order({g.cell_type for g in groups})
    fig, panels = _cell_type_panels(plt, cell_types, 3.6)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    observed = {g.name: features[g.cells] for g in groups}
    kinds = [("controls (input)", predictions[NO_CHANGE], "silver"), ("observed", observed, "black"),
             *((v, predictions[v], palette[i % len(palette)]) for i, v in enumerate(variants))]  # fmt: skip
    for ax, ct in zip(panels, cell_types, strict=True):
        mine = [g for g in groups if g.cell_type == ct]
        perturbed = np.concatenate([features[g.cells] for g in mine])
        controls = np.concatenate([features[g.controls] for g in mine])
        origin = controls.mean(0)
        shift = perturbed.mean(0) - origin
        x_axis = shift / max(np.linalg.norm(shift), 1e-12)
        rest = np.concatenate([perturbed, controls]) - origin
        rest -= np.outer(rest @ x_axis, x_axis)
        y_axis = np.linalg.svd(rest, full_matrices=False)[2][0]
        for label, cells, colour in kinds:
            points = np.concatenate([cells[g.name][rng.permutation(len(cells[g.name]))[:per_group]]
                                     for g in mine if g.name in cells]) - origin  # fmt: skip
            ax.scatter(points @ x_axis, points @ y_axis, s=5, alpha=0.6, color=colour,
                       label=label, linewidths=0)  # fmt: skip
        ax.set(title=ct, xlabel="along the observed shift", ylabel="other variation")
    panels[0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gene_shifts(shifts: pd.DataFrame, variants: list[str], path: Path, label: int = 3):
    """One panel per cell type: each decoded gene of each held-out group, its observed shift (x)
    against each variant's decoded shift (y), with the correlation in the legend and the genes
    the perturbation moved most named (``shifts``: :func:`st_finetune.genes.gene_shifts`)."""
    plt = _pyplot()
    cell_types = cell_type_order(shifts["cell_type"].unique())
    fig, panels = _cell_type_panels(plt, cell_types, 3.6)
    for ax, ct in zip(panels, cell_types, strict=True):
        sub = shifts[shifts["cell_type"] == ct]
        for variant in [v for v in variants if v in sub.columns]:
            r = np.corrcoef(sub["observed"], sub[variant])[0, 1] if len(sub) > 1 else np.nan
            ax.scatter(sub["observed"], sub[variant], s=4, alpha=0.5, linewidths=0,
                       label=f"{variant} (r = {r:.2f})")  # fmt: skip
        top = sub.loc[sub["effect"].abs().nlargest(label).index]
        for _, row in top.iterrows():
            ax.annotate(f"{row['gene']} d{row['timepoint']}", (row["observed"], row[variants[-1]]),
                        fontsize=6)  # fmt: skip
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], "k:", lw=0.8)
        ax.set(title=ct, xlabel="observed shift (log expression)", ylabel="decoded predicted shift")
        ax.legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def what_is_scored(cfg: DataConfig) -> str:
    """The report's opening: which cells are held out, and the baselines (for ``cfg``'s split)."""
    if cfg.split == "groups":
        values = ", ".join(map(str, cfg.holdout_values))
        held = (f"Every group whose {cfg.holdout_key} is {values}, held out of training "
                "entirely; each prediction starts from the group's own control cells.")  # fmt: skip
        shift = ("the same cell type's mean shift over the training timepoints"
                 if cfg.holdout_key == cfg.timepoint_key
                 else "the perturbation's mean shift over all training groups")  # fmt: skip
    else:
        held = ("Held-out cells of every (cell type, timepoint) group; each prediction starts "
                "from the group's own control cells.")  # fmt: skip
        shift = "the training split's mean shift of the same cell type and timepoint"
    return (f"{held} Baselines: *no change* (the controls as prediction), *mean shift* (controls "
            f"plus {shift}) and *pretrained* (the model before fine-tuning).")  # fmt: skip


def gene_section(shifts: pd.DataFrame, variants: list[str], seed_note: str) -> list[str]:
    """Report lines: the genes the perturbation moved most in each held-out group, observed vs
    each variant's decoded shift (``shifts``: :func:`st_finetune.genes.gene_shifts`)."""
    table = G.top_gene_shifts(shifts)
    shown = [v for v in variants if v in table.columns]
    order = {ct: i for i, ct in enumerate(cell_type_order(table["cell_type"].unique()))}
    records = sorted(table.to_dict("records"),
                     key=lambda r: (order[r["cell_type"]], M.timepoint_key(r["timepoint"])))  # fmt: skip
    lines = [f"## Genes{seed_note}", "",
             "Per held-out group, the three genes the perturbation moved most: the largest "
             "observed shift of mean expression (perturbed minus control cells, log-normalised) "
             "in units of the gene's standard deviation in the control cells, so that a gene "
             "that varies a lot between cells needs a larger shift to be listed. Beside it, each "
             "model's shift of that gene as the run's gene decoder reads it from the predicted "
             "cells (decoded prediction minus decoded controls). With few held-out cells, some "
             "listed genes move by chance.", "",
             "| cell type | timepoint | perturbation | gene | observed | " + " | ".join(shown) + " |",
             "|---" * (5 + len(shown)) + "|"]  # fmt: skip
    for r in records:
        values = " | ".join(f"{r[v]:+.2f}" for v in ["observed", *shown])
        lines.append(f"| {r['cell_type']} | {r['timepoint']} | {r['pert']} | {r['gene']} | "
                     f"{values} |")  # fmt: skip
    caption = ("Every decoded gene of every held-out group: observed shift (x) against each "
               "model's decoded shift (y), correlations in the legends, the genes moved most "
               "named with their timepoint (dotted: y = x).")  # fmt: skip
    return [*lines, "", caption, "", "![decoded vs observed gene shifts](gene_shifts.png)", ""]


def write_report(out_dir: Path, results: pd.DataFrame, run_dirs: dict[str, dict[int, Path]],
                 shifts: pd.DataFrame, title: str, cells: tuple) -> Path:  # fmt: skip
    """``results.csv``, the plots and ``report.md`` in ``out_dir``; ``run_dirs``: variant ->
    seed -> run folder; ``cells``: ``(data, predictions)`` of one seed for :func:`plot_cells`
    (its data's settings say what was held out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results.to_csv(out_dir / "results.csv", index=False)
    trained = list(run_dirs)
    seeds = list(dict.fromkeys(seed for runs in run_dirs.values() for seed in runs))  # as run
    variants = _order(results["variant"].unique(), trained)
    overall = by_seed(results)
    headline = [m for m in HEADLINE if m in overall.columns]
    mean, sd = over_seeds(overall, variants, headline)
    head = markdown_table(mean, spread=sd)
    mean, sd = over_seeds(overall, trained, [*STABILITY, *EFFICIENCY])
    train_table = markdown_table(mean, bold_best=False, spread=sd)
    curves, variant_of = {}, {}
    for name, runs in run_dirs.items():
        for seed, run_dir in runs.items():
            label = f"{name} seed {seed}" if len(seeds) > 1 else name
            curves[label], variant_of[label] = read_metrics(run_dir / "metrics.csv"), name
    training_curves(curves, out_dir, groups=variant_of)
    plot_cell_type_bars(results, variants, "energy_distance", out_dir / "energy_by_cell_type.png")
    plot_shift_trajectories(shifts, out_dir / "shift_trajectories.png")
    plot_cells(*cells, trained, out_dir / "cells.png")
    seed_note = f" (seed {seeds[0]})" if len(seeds) > 1 else ""
    cell_plot = [f"Held-out cells{seed_note} of each cell type: the control cells a prediction "
                 "starts from, the observed perturbed cells and each variant's predicted cells, "
                 "along the observed shift from control (x) and the main other direction of "
                 "variation (y).", "",
                 "![held-out cells: controls, observed and predicted](cells.png)", ""]  # fmt: skip

    if len(seeds) == 1:
        replicates = ("## Summary (mean over groups; best in bold)",)
    else:
        replicates = (f"Every variant was trained with seeds {', '.join(map(str, seeds))}; each "
                      "seed draws its own split, shared by the variants of that seed. Tables give "
                      "the mean over seeds ± the standard deviation between them.", "",
                      "## Summary (mean over groups, then over seeds; best in bold)")  # fmt: skip
    lines = [f"# {title}", "", what_is_scored(cells[0].cfg), "",
             *replicates, "", head, "",
             "## What the numbers say about the design document's hypotheses", "",
             *hypotheses(results, trained), "",
             "## Training stability and efficiency", "", train_table, "",
             "![loss](loss.png) ![gradient norm](grad_norm.png)", "",
             "## By cell type", ""]  # fmt: skip
    groups = results[(results["group"] != "overall") & (results["metric"].isin(HEADLINE))]
    for ct in cell_type_order(groups["cell_type"].unique()):
        table = by_seed(groups[groups["cell_type"] == ct], group=None)
        mean, sd = over_seeds(table, variants, [m for m in HEADLINE if m in table.columns])
        lines += [f"### {ct}", "", markdown_table(mean, spread=sd), ""]
    lines += ["![energy distance by cell type](energy_by_cell_type.png)", "",
              "![predicted vs observed shifts over time](shift_trajectories.png)", "",
              *cell_plot]  # fmt: skip
    decoder = G.load_decoder(run_dirs[trained[0]][seeds[0]])
    if decoder is not None and cells[0].table.genes is not None:
        models = [PRETRAINED, *trained]
        by_gene = G.gene_shifts(*cells, decoder, models)  # (the trajectories' shifts: above)
        plot_gene_shifts(by_gene, models, out_dir / "gene_shifts.png")
        lines += gene_section(by_gene, models, seed_note)
    lines += ["## Metric definitions", ""]
    defined = {**M.DEFINITIONS, **G.GENE_DEFINITIONS, **M.STABILITY_DEFINITIONS}
    lines += [f"- **{k}**: {v}" for k, v in defined.items() if k in set(results["metric"])]
    runs = {name: ", ".join(map(_shown, by.values())) for name, by in run_dirs.items()}
    lines += ["", "Runs: " + ", ".join(f"`{n}` ({d})" for n, d in runs.items()), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
