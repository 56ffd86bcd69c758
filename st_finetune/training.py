"""Lightning pieces of a run: set losses, the LightningModule, and the per-step metrics CSV."""

from __future__ import annotations

import csv
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

from .config import TrainingConfig

METRIC_COLUMNS = ("step", "epoch", "split", "loss", "grad_norm", "clipped", "lr", "cells_per_s",
                  "peak_memory_mb", "time_s")  # fmt: skip


def set_loss(name: str, blur: float = 0.05):
    """``loss(pred (B, S, D), target (B, S, D)) -> (B,)``: one value per cell set.

    ``energy`` is geomloss's energy distance ``E|x-y| - E|x-x'|/2 - E|y-y'|/2`` on the tensorized
    backend (FACTS.md §5: the other backends need pykeops); ``sinkhorn`` is the debiased entropic
    OT loss with ``blur``; ``mse`` compares cells row by row (order-dependent, as State's option).
    """
    if name == "mse":
        return lambda pred, target: (pred - target).pow(2).mean(dim=(-2, -1))
    from geomloss import SamplesLoss

    if name == "energy":
        return SamplesLoss("energy", backend="tensorized")
    if name == "sinkhorn":
        return SamplesLoss("sinkhorn", blur=blur, backend="tensorized")
    raise ValueError(f"unknown loss {name!r}; choose energy, sinkhorn or mse")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class STLightning(L.LightningModule):
    """Trains an :class:`STModel` on cell sets; logs loss, pre-clipping gradient norm, lr, speed.

    With ``frozen_from_base`` the frozen weights come from a base checkpoint that a resumed run
    loads again, so the training checkpoints leave them out (ST-Tahoe with LoRA + mHC: about 0.35
    instead of 1.2 GB a file) and a resume loads what trains, checking that all of it is there.
    """

    def __init__(self, model: nn.Module, cfg: TrainingConfig, set_len: int,
                 frozen_from_base: bool = False):  # fmt: skip
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.set_len = set_len
        self.loss_fn = set_loss(cfg.loss, cfg.blur)
        self.last_grad_norm: float | None = None
        self._step_start = 0.0
        self.frozen_from_base = frozen_from_base
        self.strict_loading = not frozen_from_base  # Lightning: the checkpoint lacks frozen keys

    def _keys(self, trainable: bool) -> set[str]:
        return {f"model.{name}" for name, p in self.model.named_parameters()
                if p.requires_grad == trainable}  # fmt: skip

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch)

    def set_losses(self, batch: dict) -> torch.Tensor:
        pred = self.model(batch).float()
        shape = (-1, self.set_len, pred.shape[-1])
        # in float32 under bf16 mixed precision too: the energy distance is a small difference of
        # mean distances that bf16 matrix products (autocast's choice) bias by several percent
        with torch.autocast(pred.device.type, enabled=False):
            return self.loss_fn(pred.reshape(shape), batch["pert_cell_emb"].float().reshape(shape))

    def training_step(self, batch, batch_idx):
        loss = self.set_losses(batch).mean()
        self.log("train_loss", loss, on_step=True, prog_bar=True, batch_size=len(batch["group"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.set_losses(batch).mean()
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(batch["group"]))  # fmt: skip
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.last_grad_norm = float(torch.nn.utils.get_total_norm(grads))  # foreach: few launches

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # torch's random states (dropout masks), so a resumed run matches an unbroken one; the
        # data sampling has its own seeded generators
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if self.frozen_from_base:
            frozen = self._keys(trainable=False)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k not in frozen}  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self._keys(trainable=True) - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} trained weights of this model, "
                             f"e.g. {missing[:3]}: it was written for other settings")  # fmt: skip
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: enable lora or mhc, or rebuild heads")
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup = max(self.cfg.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MetricsCSV(L.Callback):
    """Appends one row per training step and one per validation epoch to ``metrics.csv``."""

    def __init__(self, path: Path, clip: float):
        self.path = Path(path)
        self.clip = clip
        self.start = time.perf_counter()

    def _write(self, trainer, row: dict) -> None:
        if trainer.global_rank != 0:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})

    def on_fit_start(self, trainer, pl_module):
        # a resumed run drops rows past the restored step, so no step is logged twice
        if trainer.global_rank == 0 and self.path.exists() and trainer.global_step > 0:
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - pl_module._step_start
        loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
        norm = pl_module.last_grad_norm
        self._write(trainer, {
            "step": trainer.global_step, "epoch": trainer.current_epoch, "split": "train",
            "loss": loss, "grad_norm": norm,
            "clipped": int(norm is not None and self.clip > 0 and norm > self.clip),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "cells_per_s": batch["pert_cell_emb"].shape[0] / max(elapsed, 1e-9),
            "peak_memory_mb": peak_memory_mb(pl_module.device),
            "time_s": time.perf_counter() - self.start,
        })  # fmt: skip

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        self._write(trainer, {
            "step": trainer.global_step, "epoch": trainer.current_epoch, "split": "val",
            "loss": float(trainer.callback_metrics["val_loss"]),
            "peak_memory_mb": peak_memory_mb(pl_module.device),
            "time_s": time.perf_counter() - self.start,
        })  # fmt: skip


class EpochData(L.LightningDataModule):
    """Serves the run's cell sets; training sets are redrawn each epoch from (seed, epoch)."""

    def __init__(self, data, batch_size: int, num_workers: int = 0):
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer else 0
        return self.data.loader("train", self.batch_size, epoch, self.num_workers)

    def val_dataloader(self):
        return self.data.loader("val", self.batch_size, 0, self.num_workers)
