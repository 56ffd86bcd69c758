"""Fine-tune an ST model on AnnData: ``python -m st_finetune.train config.yaml [key=value ...]``.

The run folder (``output_dir/name``) receives: ``config.yaml`` (resolved), ``splits.csv``,
``metrics.csv`` (every step), ``checkpoints/{best,last}.ckpt``, ``adapter/`` (the fine-tuned
artifact), ``loss.png`` and ``grad_norm.png``, ``summary.json`` and ``train.log``. A folder that
already holds results is never overwritten unless ``overwrite=true``; ``resume=true`` continues it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from .config import RunConfig, help_text, load_config, to_dict
from .data import CellSetData, DataError, write_splits

log = logging.getLogger("st_finetune")
RESULT_FILES = ("metrics.csv", "summary.json", "checkpoints", "adapter")
RESUMABLE_CHANGES = ("training.max_epochs", "resume", "overwrite", "trainer.progress_bar")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each message."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _NoAdvert(logging.Filter):
    """Drops Lightning's tip to install its cloud logger, printed for every Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


# A deprecation inside Lightning's own code (torch >= 2.10), printed once per run; nothing a user
# of st_finetune can act on.
LIGHTNING_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def setup_logging(run_dir: Path | None = None) -> None:
    """Log to stderr, and to ``run_dir/train.log`` for this run only."""
    log.setLevel(logging.INFO)
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        handler.close()
        log.removeHandler(handler)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[st_finetune] %(message)s"))
        log.addHandler(handler)
    if run_dir is not None:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


# bad input: a missing file, a wrong setting, unusable data; each raised with its fix
USER_ERRORS = (DataError, FileNotFoundError, FileExistsError, ValueError)


def run_cli(job: Callable[[], object]) -> int:
    """A command's exit status: ``job()`` run with logging set up, and bad input told in one line
    instead of a traceback (status 1)."""
    setup_logging()
    try:
        job()
    except USER_ERRORS as err:
        log.error("%s", err)
        return 1
    return 0


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prepare_run_dir(cfg: RunConfig, is_main: bool = True) -> Path:
    """Create the run folder, refusing to clobber results (see the module docstring)."""
    run_dir = cfg.run_dir
    if not is_main:  # DDP workers: rank 0 has checked and created the folder
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    has_results = run_dir.exists() and any((run_dir / f).exists() for f in RESULT_FILES)
    if cfg.resume:
        saved = run_dir / "config.yaml"
        if not (run_dir / "checkpoints" / "last.ckpt").is_file() or not saved.is_file():
            raise FileNotFoundError(
                f"resume=true but {run_dir} holds no checkpoints/last.ckpt and config.yaml to resume"
            )
        old, new = _flat(yaml.safe_load(saved.read_text())), _flat(to_dict(cfg))
        changed = sorted(k for k in old.keys() | new.keys()
                         if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)  # fmt: skip
        if changed:
            raise ValueError(
                f"resume=true, but these settings differ from the run's config.yaml: {changed}; "
                "resume with the same settings (only training.max_epochs may grow)"
            )
        return run_dir
    if has_results and not cfg.overwrite:
        raise FileExistsError(
            f"{run_dir} already holds results; choose another name=..., continue it with "
            "resume=true, or replace it with overwrite=true"
        )
    if has_results and is_main:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_model(cfg: RunConfig, data: CellSetData):
    """The model to fine-tune and what it was loaded from."""
    from .model import STConfig, STModel, load_pretrained

    if cfg.model.checkpoint:
        model, info = load_pretrained(cfg.model.checkpoint)
        if model.config.cell_set_len != cfg.data.cell_set_len:
            log.info("cell sets of %d cells (the checkpoint was trained on %d)",
                     cfg.data.cell_set_len, model.config.cell_set_len)  # fmt: skip
        model.config.cell_set_len = cfg.data.cell_set_len
        return model, info
    m = cfg.model
    kwargs = {"num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
              "num_key_value_heads": m.n_heads, "head_dim": m.hidden_dim // m.n_heads,
              "intermediate_size": m.intermediate_size, "rms_norm_eps": 1e-6}  # fmt: skip
    if m.backbone.lower() == "gpt2":
        kwargs = {"n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.intermediate_size}
    config = STConfig(input_dim=data.table.dim, output_dim=data.table.dim,
                      pert_dim=len(data.table.pert_names), hidden_dim=m.hidden_dim,
                      cell_set_len=cfg.data.cell_set_len, n_encoder_layers=m.n_encoder_layers,
                      n_decoder_layers=m.n_decoder_layers, embed_key=cfg.data.embed_key,
                      transformer_backbone_key=m.backbone,
                      transformer_backbone_kwargs=kwargs)  # fmt: skip
    log.info("no model.checkpoint: building a new %s ST model from the config's dimensions",
             m.backbone)  # fmt: skip
    return STModel(config), None


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def training_precision(precision: str = "auto", accelerator: str = "auto") -> str:
    """Lightning's precision for ``trainer.precision``: ``auto`` is bf16 mixed precision on a GPU
    (16-bit mixed, with loss scaling, on GPUs without bf16, e.g. V100 or T4) and float32 on CPU."""
    if precision != "auto":
        return precision
    if not torch.cuda.is_available() or accelerator == "cpu":
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _trainer(cfg: RunConfig, run_dir: Path, has_val: bool):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .training import MetricsCSV

    t = cfg.trainer
    precision = training_precision(t.precision, t.accelerator)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", save_last=True,
        monitor="val_loss" if has_val else None, mode="min", save_top_k=1 if has_val else 0,
        enable_version_counter=False,
    )  # fmt: skip
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvert())
    loggers = False
    if t.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [TensorBoardLogger(run_dir, name="tensorboard", version="")]
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=precision, max_epochs=cfg.training.max_epochs,
        gradient_clip_val=cfg.training.gradient_clip or None,
        callbacks=[checkpoint, MetricsCSV(run_dir / "metrics.csv", cfg.training.gradient_clip)],
        logger=loggers, log_every_n_steps=1, reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        default_root_dir=run_dir, num_sanity_val_steps=0, use_distributed_sampler=True,
    )  # fmt: skip


def run(cfg: RunConfig) -> dict:
    """Run one fine-tuning job; returns the summary (also written to ``summary.json``)."""
    import lightning as L

    from .demo import ensure_demo_files
    from .heldout import evaluation_device, heldout_energy
    from .model import prepare_for_finetuning
    from .plots import read_metrics, training_curves
    from .training import EpochData, STLightning

    is_main = _rank() == 0
    run_dir = prepare_run_dir(cfg, is_main)
    if is_main:
        setup_logging(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if is_main and (cfg.demo_data or cfg.model.demo_pretrained):
        ensure_demo_files(cfg.data.paths[0] if cfg.demo_data and cfg.data.paths else None,
                          cfg.model.checkpoint if cfg.model.demo_pretrained else None)  # fmt: skip
    L.seed_everything(cfg.training.seed, workers=True, verbose=False)
    data = CellSetData(cfg.data, cfg.training.seed)
    if is_main:
        write_splits(data.table, data.split, run_dir / "splits.csv")
        info = data.summary()
        log.info("data: %d cells, %d features, perturbations %s, %s train / %s val / %s test "
                 "groups", info["cells"], info["dim"], info["perturbations"],
                 info["groups"]["train"], info["groups"]["val"], info["groups"]["test"])  # fmt: skip
    model, pretrained = build_model(cfg, data)
    if cfg.resume and pretrained is not None:
        _check_same_base(run_dir, pretrained)
    rebuilt, params = prepare_for_finetuning(
        model, input_dim=data.table.dim, pert_names=data.table.pert_names,
        pretrained_perts=pretrained.pert_names if pretrained else data.table.pert_names,
        lora=cfg.lora, mhc=cfg.mhc, new_model=pretrained is None,
    )  # fmt: skip
    before = None
    device = evaluation_device(cfg.trainer.accelerator, cfg.trainer.strategy)
    if is_main:
        before = heldout_energy(model, data, device=device)
        _save_artifact(model, run_dir / "pretrained_adapter", pretrained, data, rebuilt, cfg)
    model.train()  # load_pretrained returns eval mode; Lightning keeps whatever mode it gets
    module = STLightning(model, cfg.training, cfg.data.cell_set_len,
                         frozen_from_base=pretrained is not None)  # fmt: skip
    trainer = _trainer(cfg, run_dir, has_val=bool(data.groups["val"]))
    start = time.perf_counter()
    last = run_dir / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LIGHTNING_DEPRECATION)
        if cfg.resume:  # the checkpoints it finds there are the ones it resumes from
            warnings.filterwarnings("ignore", message="Checkpoint directory .* is not empty")
        trainer.fit(module, datamodule=EpochData(data, cfg.training.batch_size,
                                                 cfg.training.num_workers),
                    ckpt_path=str(last) if cfg.resume else None)  # fmt: skip
    seconds = time.perf_counter() - start
    checksum = parameter_checksum(model)
    agree = _ranks_agree(trainer, checksum)
    if not trainer.is_global_zero:
        return {}
    model.cpu()
    after = heldout_energy(model, data, device=device)
    _save_artifact(model, run_dir / "adapter", pretrained, data, rebuilt, cfg)
    decoder_info = _gene_decoder(cfg, data, run_dir, device) if cfg.data.gene_key else None
    metrics = read_metrics(run_dir / "metrics.csv")
    plots = training_curves({cfg.name: metrics}, run_dir, cfg.training.gradient_clip)
    train_rows = metrics[metrics["split"] == "train"]
    val_rows = metrics[metrics["split"] == "val"]
    epochs = max(int(trainer.current_epoch), 1)
    summary = {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "variant": {"lora": cfg.lora.enable, "mhc": cfg.mhc.enable},
        "parameters": params,
        "rebuilt_heads": rebuilt,
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "seconds": seconds,
        "seconds_per_epoch": seconds / epochs,
        "final_train_loss": float(train_rows["loss"].iloc[-1]) if len(train_rows) else None,
        "final_val_loss": float(val_rows["loss"].iloc[-1]) if len(val_rows) else None,
        "peak_memory_mb": float(metrics["peak_memory_mb"].max()),
        "heldout_energy_pretrained": before["overall"],
        "heldout_energy_finetuned": after["overall"],
        "heldout_energy_groups": {"pretrained": before["groups"], "finetuned": after["groups"]},
        "heldout_energy_set_len": cfg.data.cell_set_len,
        "world_size": trainer.world_size,
        "ranks_agree": agree,
        "parameter_checksum": checksum,
        "data": data.summary(),
        "base_checkpoint": str(pretrained.checkpoint) if pretrained else None,
        "gene_decoder": decoder_info,
        "files": {
            "metrics": "metrics.csv",
            "splits": "splits.csv",
            "adapter": "adapter/",
            "checkpoints": "checkpoints/",
            "plots": [p.name for p in plots],
        },  # fmt: skip
        "config": to_dict(cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(format_summary(summary), flush=True)
    return summary


def _gene_decoder(cfg: RunConfig, data: CellSetData, run_dir: Path, device) -> dict:
    """Fit and save the run's gene decoder (:mod:`st_finetune.genes`); its record."""
    from .genes import FILE, fit_decoder, save_decoder

    start = time.perf_counter()
    decoder, info = fit_decoder(data.table, data.split, cfg.decoder, cfg.training.seed, device)
    save_decoder(decoder, info, run_dir)
    info["seconds"] = time.perf_counter() - start
    log.info("gene decoder: %d of %d genes, %d epochs, R^2 %.3f on validation cells (%s)",
             info["genes"], info["of_genes"], info["epochs"], info["val_r2"], FILE)  # fmt: skip
    return info


def _save_artifact(model, folder: Path, pretrained, data, rebuilt, cfg: RunConfig) -> None:
    """The small fine-tuned artifact, or for a model without a base a whole State-format
    checkpoint, LoRA merged and mHC recorded, that :func:`load_pretrained` loads back."""
    from .model import export_merged, save_finetuned

    if pretrained is None:
        export_merged(model, folder / "model.ckpt", cfg.mhc if cfg.mhc.enable else None,
                      data.table.pert_names)  # fmt: skip
        return
    save_finetuned(model, folder, base_checkpoint=pretrained.checkpoint,
                   base_sha256=pretrained.sha256, pert_names=data.table.pert_names,
                   rebuilt=rebuilt, lora=cfg.lora, mhc=cfg.mhc)  # fmt: skip


def _check_same_base(run_dir: Path, pretrained) -> None:
    """A resumed run's frozen weights come from model.checkpoint again: it must be the same file
    (its hash as the run recorded it before training)."""
    manifest = run_dir / "pretrained_adapter" / "manifest.json"
    if not manifest.is_file():
        return
    recorded = json.loads(manifest.read_text())["base_sha256"]
    if recorded != pretrained.sha256:
        raise ValueError(
            f"resume=true, but {pretrained.checkpoint} (sha256 {pretrained.sha256[:12]}...) is not "
            f"the base checkpoint this run started from ({recorded[:12]}...): point "
            "model.checkpoint at that file"
        )


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def _ranks_agree(trainer, checksum: str) -> bool:
    if trainer.world_size == 1:
        return True
    import torch.distributed as dist

    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, checksum)
    return len(set(gathered)) == 1


def format_summary(s: dict) -> str:
    p = s["parameters"]
    variant = "+".join(k.upper() if k == "mhc" else k.capitalize() for k, v in s["variant"].items()
                       if v) or "heads only"  # fmt: skip
    lines = [
        "",
        f"== {s['name']} ({variant}) finished: {s['steps']} steps, {s['epochs']} epochs, "
        f"{s['seconds']:.0f} s ({s['seconds_per_epoch']:.1f} s/epoch)",
        f"trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['percent']:.2f}%)"
        + (f"; rebuilt heads: {', '.join(s['rebuilt_heads'])}" if s["rebuilt_heads"] else ""),
        f"final loss: train {s['final_train_loss']:.4f}"
        + (f", val {s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else ""),
        f"held-out energy distance of {s['heldout_energy_set_len']}-cell sets as in training "
        "(test split, mean over groups; `evaluate` scores whole groups): pretrained "
        f"{s['heldout_energy_pretrained']:.4f} -> fine-tuned {s['heldout_energy_finetuned']:.4f} "
        f"({heldout_change(s)})",
        *_decoder_line(s.get("gene_decoder")),
        f"peak memory: {s['peak_memory_mb']:.0f} MB; processes: {s['world_size']}"
        + ("" if s["ranks_agree"] else " (WARNING: ranks disagree)"),
        f"run folder: {s['run_dir']} (metrics.csv, splits.csv, adapter/, checkpoints/, "
        "loss.png, grad_norm.png, summary.json)",
    ]
    return "\n".join(lines)


def heldout_change(s: dict) -> str:
    """The held-out energy's change as a biologist can weigh it: relative to the pretrained model,
    and in how many of the test groups it fell (a mean can move on one group's change alone)."""
    groups = s["heldout_energy_groups"]
    before, after = groups["pretrained"], groups["finetuned"]
    shared = before.keys() & after.keys()
    if not shared:
        return "no test groups"
    lower = sum(after[g] < before[g] for g in shared)
    change = s["heldout_energy_finetuned"] / s["heldout_energy_pretrained"] - 1
    return f"{change:+.1%}; lower in {lower} of {len(shared)} groups"


def _decoder_line(info: dict | None) -> list[str]:
    if not info:
        return []
    test = f", test cells {info['test_r2']:.3f}" if info["test_r2"] is not None else ""
    return [f"gene decoder (gene_decoder.pt): {info['genes']} genes, expression variance "
            f"explained (R^2) on validation cells {info['val_r2']:.3f}{test}"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + help_text())
        return 0 if argv else 2
    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    return run_cli(lambda: run(load_config(path, overrides)))


if __name__ == "__main__":
    sys.exit(main())
