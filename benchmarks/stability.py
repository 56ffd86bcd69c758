"""Gradient-norm stability of plain residual vs hyper-connections (HC) vs mHC (issue 7).

The same deep pre-norm transformer is trained three ways from the same seed and the same data:

* ``plain``: ``x + F(x)`` around every attention and MLP sub-layer;
* ``hc``: unconstrained hyper-connections (``MHCLayer(constraint="none")``, H_res = I + learned);
* ``mhc``: manifold-constrained hyper-connections (Sinkhorn-projected H_res).

Task: next-token prediction on sequences from a fixed random Markov chain (a bigram source with a
known entropy rate, so the loss has a floor: ``entropy_rate`` in the results). Every variant is run
at a sweep of learning rates; per step we record loss, global gradient norm (before clipping; no
clipping is applied, so instabilities show) and, for HC/mHC, the single-layer and composite Amax
gains of the token-averaged H_res. At the end, gains against layer index as in the paper's figures.

Scales: ``small`` (CPU, a few minutes: 24 blocks = 48 wrapped sub-layers, width 64) and ``large``
(GPU: 32 blocks, width 256, sequences of 128, 300 steps); ``MHC_STABILITY_SCALE`` picks one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from blocks import MLP, Attention
from torch import nn

from mhc_kernels import MHCLayer, amax_gain, collapse_streams, expand_streams
from mhc_kernels.metrics import loss_spikes, recorded_h_res

VARIANTS = ("plain", "hc", "mhc")


@dataclass(frozen=True)
class Scale:
    blocks: int
    width: int
    heads: int
    seq: int
    batch: int
    steps: int
    vocab: int
    lrs: tuple[float, ...]
    n_streams: int = 4
    sinkhorn_iters: int = 20
    seed: int = 0


SCALES = {
    "small": Scale(
        blocks=24, width=64, heads=4, seq=32, batch=16, steps=120, vocab=32, lrs=(1e-3, 3e-3, 1e-2)
    ),  # fmt: skip
    "large": Scale(
        blocks=32,
        width=256,
        heads=8,
        seq=128,
        batch=32,
        steps=300,
        vocab=64,
        lrs=(3e-4, 1e-3, 3e-3),
    ),  # fmt: skip
}


def current_scale() -> tuple[str, Scale]:
    name = os.environ.get("MHC_STABILITY_SCALE", "small")
    if name not in SCALES:
        raise ValueError(f"MHC_STABILITY_SCALE must be one of {sorted(SCALES)}, got {name!r}")
    return name, SCALES[name]


class DeepLM(nn.Module):
    """Embedding -> ``blocks`` x (attention, MLP) sub-layers -> RMSNorm -> logits."""

    def __init__(self, scale: Scale, variant: str):
        super().__init__()
        self.variant = variant
        self.n = scale.n_streams
        self.embed = nn.Embedding(scale.vocab, scale.width)
        branches = []
        for _ in range(scale.blocks):
            branches += [Attention(scale.width, scale.heads, causal=True, eps=None),
                         MLP(scale.width)]  # fmt: skip
        if variant == "plain":
            self.layers = nn.ModuleList(branches)
        else:
            constraint = "sinkhorn" if variant == "mhc" else "none"
            self.layers = nn.ModuleList(
                MHCLayer(
                    b,
                    scale.width,
                    self.n,
                    sinkhorn_iters=scale.sinkhorn_iters,
                    constraint=constraint,
                    backend="auto",
                )  # fmt: skip
                for b in branches
            )
        self.norm = nn.RMSNorm(scale.width)
        self.head = nn.Linear(scale.width, scale.vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.variant == "plain":
            for layer in self.layers:
                h = h + layer(h)
        else:
            h = expand_streams(h, self.n)
            for layer in self.layers:
                h = layer(h)
            h = collapse_streams(h)
        return self.head(self.norm(h))

    def record(self, on: bool) -> None:
        for layer in self.layers:
            if isinstance(layer, MHCLayer):
                layer.record_h_res = on


class MarkovSource:
    """Sequences from a fixed random bigram chain; ``entropy_rate`` is the best achievable loss."""

    def __init__(self, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        logits = 2.5 * torch.randn(vocab, vocab, generator=gen)
        self.trans = torch.softmax(logits, dim=-1)
        stationary = torch.full((vocab,), 1.0 / vocab)
        for _ in range(200):
            stationary = stationary @ self.trans
        ent = -(self.trans * self.trans.clamp_min(1e-30).log()).sum(-1)
        self.entropy_rate = float(stationary @ ent)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.vocab = vocab

    def batch(self, batch: int, seq: int) -> torch.Tensor:
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (batch,), generator=self.gen)
        for t in range(seq):
            tokens[:, t + 1] = torch.multinomial(self.trans[tokens[:, t]], 1, generator=self.gen)[
                :, 0
            ]
        return tokens


def train(scale: Scale, variant: str, lr: float, device: torch.device, record_gains: bool) -> dict:
    """One training run; returns its per-step series and final gains."""
    torch.manual_seed(scale.seed)
    model = DeepLM(scale, variant).to(device)
    source = MarkovSource(scale.vocab, scale.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    series = {"loss": [], "grad_norm": [], "composite_forward_gain": [],
              "composite_backward_gain": [], "max_layer_backward_gain": []}  # fmt: skip
    diverged_at = None
    start = time.perf_counter()
    for step in range(scale.steps):
        tokens = source.batch(scale.batch, scale.seq).to(device)
        model.record(record_gains and variant != "plain")
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, scale.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        )
        loss_value, norm_value = loss.item(), norm.item()
        series["loss"].append(loss_value)
        series["grad_norm"].append(norm_value)
        if variant != "plain" and record_gains:
            gains = amax_gain(recorded_h_res(model))
            series["composite_forward_gain"].append(float(gains["composite_forward_gain"][-1]))
            series["composite_backward_gain"].append(float(gains["composite_backward_gain"][-1]))
            series["max_layer_backward_gain"].append(float(gains["backward_gain"].max()))
        if not math.isfinite(loss_value) or not math.isfinite(norm_value):
            diverged_at = step
            break
        opt.step()
    result = {"variant": variant, "lr": lr, "series": series, "diverged_at": diverged_at,
              "seconds": time.perf_counter() - start}  # fmt: skip
    if variant != "plain" and diverged_at is None:
        with torch.no_grad():
            model.record(True)
            model(source.batch(scale.batch, scale.seq).to(device)[:, :-1])
            gains = amax_gain(recorded_h_res(model))
        result["final_gains"] = {k: v.tolist() for k, v in gains.items()}
    return result


def summarise(run: dict) -> dict:
    norm = np.asarray(run["series"]["grad_norm"])
    loss = np.asarray(run["series"]["loss"])
    tail = loss[-max(1, len(loss) // 10) :]
    out = {"variant": run["variant"], "lr": run["lr"], "diverged": run["diverged_at"] is not None,
           "diverged_at": run["diverged_at"], "final_loss": float(np.mean(tail)),
           "loss_spikes": loss_spikes(loss), "grad_norm_median": float(np.median(norm)),
           "grad_norm_p99": float(np.percentile(norm, 99)), "grad_norm_max": float(norm.max()),
           "seconds": run["seconds"]}  # fmt: skip
    if "final_gains" in run:
        g = run["final_gains"]
        out.update({
            "composite_forward_gain_max": max(g["composite_forward_gain"]),
            "composite_backward_gain_max": max(g["composite_backward_gain"]),
            "layer_backward_gain_max": max(g["backward_gain"]),
            "max_abs_log_col_sum": max(g["composite_max_abs_log_col_sum"]),
        })  # fmt: skip
    return out


def plot(results: dict, out_dir: Path, scale: Scale) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main_lr = scale.lrs[len(scale.lrs) // 2]
    runs = {r["variant"]: r for r in results["runs"] if r["lr"] == main_lr}
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in ("hc", "mhc"):
        if "final_gains" not in runs.get(variant, {}):
            continue
        g = runs[variant]["final_gains"]
        layers = np.arange(1, len(g["forward_gain"]) + 1)
        axes[0].plot(layers, g["forward_gain"], label=f"{variant} forward")
        axes[0].plot(layers, g["backward_gain"], "--", label=f"{variant} backward")
        axes[1].plot(layers, g["composite_forward_gain"], label=f"{variant} forward")
        axes[1].plot(layers, g["composite_backward_gain"], "--", label=f"{variant} backward")
    axes[0].set(title="single-layer Amax gain", xlabel="layer index", yscale="log")
    axes[1].set(title="composite Amax gain (layers 1..l)", xlabel="layer index", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "amax_gain_vs_layer.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    for key, name in (("grad_norm", "grad_norm_vs_step.png"), ("loss", "loss_vs_step.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant, run in runs.items():
            ax.plot(run["series"][key], label=variant, lw=1)
        if key == "loss":
            ax.axhline(results["entropy_rate"], color="grey", ls=":", label="entropy rate")
        ax.set(title=f"{key.replace('_', ' ')} (lr {main_lr:g})", xlabel="step", yscale="log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def write_results(results: dict, out_dir: Path, scale_name: str, scale: Scale, env: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"scale": scale_name, "config": asdict(scale), "environment": env, **results,
               "summary": [summarise(r) for r in results["runs"]]}  # fmt: skip
    if importlib.util.find_spec("matplotlib") is not None:
        payload["plots"] = [p.name for p in plot(results, out_dir, scale)]
    else:  # the GPU machines may lack matplotlib: the JSON holds every series to plot later
        payload["plots"] = "not drawn: matplotlib is not installed"
    path = out_dir / f"stability-{scale_name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path
