"""Run configuration: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

    python -m st_finetune.train configs/demo.yaml training.max_epochs=3 lora.r=8

Unknown keys are errors that suggest the nearest valid key; ``--help`` lists every key with its
default. Relative paths are resolved against the current folder and stored absolute.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .model.adapt import LoraSettings, MHCSettings

SPLIT_MODES = ("cells", "groups")
LOSSES = ("energy", "sinkhorn", "mse")


@dataclass
class DataConfig:
    """Where the cells are and how they are grouped.

    Attributes:
        paths: ``.h5ad`` files or folders of them.
        pert_col: obs column with the perturbation (condition) of each cell.
        control_pert: the control label in ``pert_col`` (e.g. ``sham``).
        cell_type_key: obs column with the cell type.
        timepoint_key: optional obs column with the timepoint (e.g. day 10/14/19).
        batch_key: optional obs column with the batch (recorded, used for nothing else yet).
        embed_key: ``obsm`` key with the features (e.g. ``X_state``), or ``X`` for the matrix.
        gene_key: optional gene expression beside embedding features: ``X`` or a ``layers`` name
            (log-normalised values). Each run then fits a gene decoder (``decoder``) and the
            evaluation adds gene-space metrics; predictions gain decoded genes.
        cell_set_len: cells per set (the ST model's sequence length).
        control_sets: also train on control-to-control sets (identity examples).
        split: ``cells`` (held-out cells within every group) or ``groups`` (whole held-out groups).
        val_fraction, test_fraction: per-group fractions of held-out cells (``split=cells``).
        holdout_key, holdout_values: obs column and values whose groups are the test split
            (``split=groups``, e.g. ``timepoint`` and ``[19]``).
        min_cells: groups with fewer perturbed cells are reported and skipped.
    """

    paths: list[str] = field(default_factory=list)
    pert_col: str = "condition"
    control_pert: str = "sham"
    cell_type_key: str = "cell_type"
    timepoint_key: str | None = "timepoint"
    batch_key: str | None = None
    embed_key: str = "X_state"
    gene_key: str | None = None
    cell_set_len: int = 256
    control_sets: bool = False
    split: str = "cells"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    holdout_key: str | None = None
    holdout_values: list = field(default_factory=list)
    min_cells: int = 5

    def __post_init__(self):
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if isinstance(self.holdout_values, str | int):
            self.holdout_values = [self.holdout_values]
        if self.split not in SPLIT_MODES:
            raise ValueError(f"data.split must be one of {SPLIT_MODES}, got {self.split!r}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("data.val_fraction and data.test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be < 1")
        if self.cell_set_len < 1:
            raise ValueError(f"data.cell_set_len must be >= 1, got {self.cell_set_len}")
        if self.split == "groups" and not (self.holdout_key and self.holdout_values):
            raise ValueError("data.split=groups needs data.holdout_key and data.holdout_values")
        if self.gene_key and self.embed_key == "X":
            raise ValueError("data.gene_key decodes embeddings to genes; with data.embed_key=X the "
                             "features are the genes already: leave data.gene_key unset")  # fmt: skip


@dataclass
class ModelConfig:
    """The model to fine-tune.

    Attributes:
        checkpoint: a State run folder or ``.ckpt`` (ST-Tahoe's layout); empty builds a new model
            from the dimensions below (no pretraining), trained in full.
        hidden_dim, n_layers, n_heads, intermediate_size, n_encoder_layers, n_decoder_layers,
            backbone: dimensions of a new model (ignored with a checkpoint).
        demo_pretrained: build the demo's small pretrained checkpoint at ``checkpoint`` when it is
            missing and its folder is named ``st_pretrained`` (configs/demo.yaml; any other
            missing checkpoint is an error, never a stand-in).
    """

    checkpoint: str = ""
    hidden_dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    intermediate_size: int = 512
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    backbone: str = "llama"
    demo_pretrained: bool = False


@dataclass
class TrainingConfig:
    """Optimisation (defaults from the seed design document).

    Attributes:
        max_epochs, lr, weight_decay, warmup_steps, gradient_clip: AdamW with linear warm-up.
        batch_size: cell sets per batch.
        loss: ``energy`` (geomloss, tensorized), ``sinkhorn`` (with ``blur``) or ``mse``.
        blur: entropic blur of the sinkhorn loss (no effect on ``energy``).
        seed: seeds the splits, the set sampling and the initialisation.
        num_workers: data loader worker processes (0: sets are drawn in the training process; on
            a GPU, 2-4 draw the next batch while the step runs).
    """

    max_epochs: int = 5
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 100
    gradient_clip: float = 1.0
    batch_size: int = 16
    loss: str = "energy"
    blur: float = 0.05
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"training.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("training.max_epochs and training.batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"training.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_steps", "gradient_clip", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings.

    Attributes:
        accelerator: ``auto``, ``cpu`` or ``gpu``.
        devices: devices per node (``auto`` or a count).
        num_nodes: nodes.
        strategy: ``auto``, ``ddp``, ``ddp_spawn``, ...
        precision: ``auto`` (bf16 mixed on GPU, 16-bit mixed where the GPU lacks bf16, 32 on
            CPU) or a Lightning precision string.
        tensorboard: also log to TensorBoard (needs the tensorboard package).
        progress_bar: show Lightning's progress bar.
    """

    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    tensorboard: bool = False
    progress_bar: bool = True


@dataclass
class DecoderConfig:
    """The gene decoder (embedding -> gene expression) fitted when ``data.gene_key`` is set.

    Attributes:
        n_genes: decode the most variable genes of the training cells (0: every gene).
        hidden: width of its two hidden layers.
        max_epochs, patience: epochs at most; stop after ``patience`` epochs without a better
            validation error (the best epoch's weights are kept).
        lr, weight_decay, batch_size: AdamW on mini-batches of cells.
    """

    n_genes: int = 2000
    hidden: int = 1024
    max_epochs: int = 100
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 512

    def __post_init__(self):
        if self.n_genes < 0:
            raise ValueError(f"decoder.n_genes must be >= 0 (0: every gene), got {self.n_genes}")
        for name in ("hidden", "max_epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"decoder.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("decoder.lr must be > 0 and decoder.weight_decay >= 0")


@dataclass
class RunConfig:
    """One fine-tuning run.

    Attributes:
        name: the run's name (a folder under ``output_dir``).
        output_dir: where run folders go.
        overwrite: replace a run folder that already holds results.
        resume: continue the run in its folder from its last checkpoint.
        demo_data: generate the synthetic wound-healing study at ``data.paths[0]`` when it is
            missing and named ``wound_healing.h5ad`` (any other missing file is an error).
    """

    name: str = "run"
    output_dir: str = "runs"
    overwrite: bool = False
    resume: bool = False
    demo_data: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    mhc: MHCSettings = field(default_factory=MHCSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def valid_keys(cls=RunConfig, prefix: str = "") -> dict[str, object]:
    """Every dotted key with its default value (every section has defaults for all fields)."""
    keys = {}
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(valid_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = getattr(defaults, f.name)
    return keys


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(value, tp, key: str):
    """Coerce a YAML or command-line value to the field's type, with a clear error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"{key}: cannot read {value!r} as {tp}")
    if origin is list or tp is list:
        if isinstance(value, str):
            value = (
                yaml.safe_load(value)
                if value.startswith("[")
                else [v for v in value.split(",") if v]
            )
        if not isinstance(value, list):
            value = [value]
        inner = args[0] if args else typing.Any
        return [_coerce(v, inner, key) for v in value] if inner is not typing.Any else value
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            raise ValueError(f"{key} must be a string, got null")
        return str(value)
    return value


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            full = f"{prefix}{key}"
            raise ValueError(f"unknown config key '{full}'{_suggest(full, valid_keys())}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def read_yaml(path: Path) -> dict:
    """A YAML file's mapping (empty for an empty file); a syntax error names the file and the line."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(
            f"{path} is not valid YAML ({problem}{where}); quote values that hold brackets, "
            "colons or '#' inside a list, e.g. overrides: [\"data.paths=[a.h5ad]\"]"
        ) from None
    if not isinstance(tree, dict):
        raise ValueError(
            f"{path} must hold a mapping of keys (e.g. 'data:'), not {type(tree).__name__}"
        )
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML config and apply ``key=value`` overrides; returns a validated RunConfig."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        tree = read_yaml(path)
    keys = valid_keys()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. lora.r=8)")
        key, value = item.split("=", 1)
        if key not in keys:
            raise ValueError(f"unknown config key '{key}'{_suggest(key, keys)}")
        _set_dotted(tree, key, value)
    config = _build(RunConfig, tree)
    _resolve_paths(config)
    return config


def _resolve_paths(config: RunConfig) -> None:
    def resolve(p: str) -> str:
        return str(Path(p).resolve()) if p else p

    config.data.paths = [resolve(p) for p in config.data.paths]
    config.model.checkpoint = resolve(config.model.checkpoint)
    config.output_dir = resolve(config.output_dir)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def help_text() -> str:
    lines = ["config keys (dotted, as key=value overrides) and their defaults:"]
    for key, default in valid_keys().items():
        lines.append(f"  {key} = {default!r}")
    return "\n".join(lines)
