"""PNG plots of training curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(runs: dict[str, pd.DataFrame], out_dir: str | Path, clip: float | None = None
                    ) -> list[Path]:  # fmt: skip
    """Loss and gradient-norm curves, one line per run; returns the written files."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, frame in runs.items():
        train = frame[frame["split"] == "train"]
        val = frame[frame["split"] == "val"]
        (line,) = ax.plot(train["step"], train["loss"], lw=1, alpha=0.8, label=f"{name} train")
        if len(val):
            ax.plot(val["step"], val["loss"], "o--", color=line.get_color(), label=f"{name} val")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, frame in runs.items():
        train = frame[(frame["split"] == "train") & frame["grad_norm"].notna()]
        ax.plot(train["step"], train["grad_norm"], lw=1, alpha=0.8, label=name)
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
