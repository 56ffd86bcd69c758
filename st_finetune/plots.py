"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

import collections
from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(runs: dict[str, pd.DataFrame], out_dir: str | Path, clip: float | None = None,
                    groups: dict[str, str] | None = None) -> list[Path]:  # fmt: skip
    """Loss and gradient-norm curves, one line per run; runs of one of ``groups`` (run -> group,
    e.g. a variant's seeds) share a colour and a legend entry. Returns the written files."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = groups or {name: name for name in runs}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {g: palette[i % len(palette)] for i, g in enumerate(dict.fromkeys(groups.values()))}
    count = collections.Counter(groups.values())

    def style(name, seen, suffix=""):
        """Colour and, for a group's first run, legend label of ``name``'s lines."""
        group = groups[name]
        runs = f" ({count[group]} runs)" if count[group] > 1 else ""
        label = None if (group, suffix) in seen else f"{group}{suffix}{runs}"
        seen.add((group, suffix))
        return {"color": colour[group], "label": label}

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for name, frame in runs.items():
        train = frame[frame["split"] == "train"]
        val = frame[frame["split"] == "val"]
        ax.plot(train["step"], train["loss"], lw=1, alpha=0.8, **style(name, seen, " train"))
        if len(val):
            ax.plot(val["step"], val["loss"], "o--", **style(name, seen, " val"))
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for name, frame in runs.items():
        train = frame[(frame["split"] == "train") & frame["grad_norm"].notna()]
        ax.plot(train["step"], train["grad_norm"], lw=1, alpha=0.8, **style(name, seen))
    if clip:
        ax.axhline(clip, color="grey", ls=":", label=f"clip {clip:g}")
    ax.set(xlabel="step", ylabel="global gradient norm (before clipping)", title="Gradient norm",
           yscale="log")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "grad_norm.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def read_metrics(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    for col in ("loss", "grad_norm", "lr", "cells_per_s", "peak_memory_mb", "time_s"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame
