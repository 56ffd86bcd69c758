"""Read and write ST checkpoints in State's on-disk format, safely.

A State run folder holds ``config.yaml``, ``final.ckpt`` (or ``checkpoints/{best,last,final}.ckpt``),
``var_dims.pkl`` and ``pert_onehot_map.pt``. A ``.ckpt`` is a Lightning dictionary with
``state_dict`` and ``hyper_parameters``; State pickles a ``torch.nn.MSELoss`` into the latter, so
``torch.load(weights_only=True)`` needs that class allow-listed. Nothing else is ever unpickled:
``var_dims.pkl`` goes through a restricted unpickler that admits only plain containers, strings,
numbers and numpy arrays.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from .st import STConfig, STModel

log = logging.getLogger("st_finetune")

# Classes State pickles into hyper_parameters; allowed for weights_only loading, nothing more.
SAFE_GLOBALS = [
    torch.nn.MSELoss,
    torch.nn.L1Loss,
    torch.nn.SmoothL1Loss,
    torch.nn.HuberLoss,
]
CHECKPOINT_NAMES = ("final.ckpt", "checkpoints/final.ckpt", "checkpoints/best.ckpt",
                    "checkpoints/last.ckpt")  # fmt: skip
IGNORED_PREFIXES = ("gene_decoder.",)  # untrained in HVG checkpoints (FACTS.md §5)
TOKEN_TABLES = ("transformer_backbone.embed_tokens.weight", "transformer_backbone.wte.weight")


@dataclass
class PretrainedInfo:
    """What :func:`load_pretrained` learned besides the weights."""

    path: Path
    checkpoint: Path
    sha256: str
    config: STConfig
    pert_names: list[str] = field(default_factory=list)
    gene_names: list[str] | None = None
    hyper_parameters: dict = field(default_factory=dict)

    @property
    def embed_key(self) -> str | None:
        return self.config.embed_key


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_torch_load(path: Path, extra_safe_globals=()) -> object:
    """``torch.load(weights_only=True)`` with State's loss classes (and only those) allowed."""
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_safe_globals]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln]
        raise ValueError(
            f"{path} pickles an object outside the allow-list, so it was not loaded (unpickling "
            f"runs arbitrary code). torch said: {lines[0] if lines else str(err)[:300]}. If you "
            "trust the file and the class is plain data, pass it in extra_safe_globals."
        ) from err


class _PlainDataUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str",
                                        "int", "float", "bool", "complex", "bytes", "slice")
    } | {  # fmt: skip
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
    }  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise ValueError(
            f"refusing to unpickle {module}.{name}: only plain data is read from var_dims.pkl"
        )


def read_var_dims(path: Path) -> dict:
    with open(path, "rb") as f:
        return _PlainDataUnpickler(io.BytesIO(f.read())).load()


def find_checkpoint(path: Path) -> Path:
    """The ``.ckpt`` file for a file or a run folder as downloaded."""
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint or model folder at {path} (model.checkpoint): give a State run folder "
            "as downloaded (config.yaml, final.ckpt, var_dims.pkl, ...) or a .ckpt file; an empty "
            "model.checkpoint= builds a new model from the model.* dimensions"
        )
    if path.is_file():
        return path
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*.ckpt"))
    raise FileNotFoundError(
        f"{path} holds no {' or '.join(CHECKPOINT_NAMES)}"
        + (f"; .ckpt files found: {found}" if found else " and no .ckpt file at all")
    )


def config_from_hparams(hparams: dict) -> STConfig:
    known = STConfig.__dataclass_fields__
    required = ("input_dim", "output_dim", "pert_dim", "hidden_dim")
    missing = [k for k in required if k not in hparams]
    if missing:
        raise ValueError(f"checkpoint hyper_parameters lack {missing}; found {sorted(hparams)}")
    values = {k: v for k, v in hparams.items() if k in known}
    values["transformer_backbone_kwargs"] = dict(hparams.get("transformer_backbone_kwargs") or {})
    return STConfig(**values)


def check_state_dict(model: torch.nn.Module, state: dict) -> dict:
    """Drop ignorable keys, then fail with every missing, unexpected or mis-shaped key named."""
    state = dict(state)
    for key in [k for k in state if k.startswith(IGNORED_PREFIXES)]:
        del state[key]
    for key in TOKEN_TABLES:
        table = state.pop(key, None)
        if table is not None:
            kind = "zeroed" if not table.any() else "non-zero but unused (inputs are embeddings)"
            log.info("dropping %s %s token table %s", kind, tuple(table.shape), key)
    expected = model.state_dict()
    problems = [f"missing key {k} (expected shape {tuple(v.shape)})"
                for k, v in expected.items() if k not in state]  # fmt: skip
    problems += [f"unexpected key {k} (shape {tuple(v.shape)})"
                 for k, v in state.items() if k not in expected]  # fmt: skip
    problems += [
        f"shape mismatch for {k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint does not match the ST model:\n  {shown}{more}")
    return state


def load_pretrained(path: str | Path, extra_safe_globals=()) -> tuple[STModel, PretrainedInfo]:
    """Load an ST checkpoint (run folder or ``.ckpt``) into an :class:`STModel` in eval mode.

    Llama checkpoints always get the bidirectional, position-free backbone, whether or not their
    hyper-parameters carry ``bidirectional_attention`` (ST-Tahoe's do not; FACTS.md §5).

    Example:
        >>> model, info = load_pretrained("ST-Tahoe/")  # doctest: +SKIP
        >>> info.pert_names[:2], info.config.input_dim  # doctest: +SKIP
    """
    path = Path(path)
    ckpt_path = find_checkpoint(path)
    ckpt = safe_torch_load(ckpt_path, extra_safe_globals)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint: no 'state_dict' (has {keys})")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    config = config_from_hparams(hparams)
    if config.transformer_backbone_key == "llama":
        flag = config.transformer_backbone_kwargs.get("bidirectional_attention", "absent")
        log.info(
            "building the bidirectional, position-free Llama backbone (bidirectional_attention "
            "in the checkpoint: %s); State's causal default would silently be the wrong model",
            flag,
        )
    model = STModel(config)
    if hparams.get("mhc"):  # a merged export of a LoRA + mHC model (artifact.export_merged)
        from .adapt import MHCSettings, add_mhc

        add_mhc(model, MHCSettings(**hparams["mhc"]))
    state = check_state_dict(model, ckpt["state_dict"])
    model.load_state_dict(state, strict=True)
    model.eval()
    info = PretrainedInfo(path, ckpt_path, file_sha256(ckpt_path), config, hyper_parameters=hparams)
    folder = path if path.is_dir() else None
    if folder is not None:
        _read_folder_metadata(folder, info)
    if not info.pert_names:
        info.pert_names = list(hparams.get("pert_names") or [])
    return model, info


def _read_folder_metadata(folder: Path, info: PretrainedInfo) -> None:
    onehot = folder / "pert_onehot_map.pt"
    if onehot.is_file():
        mapping = safe_torch_load(onehot)
        info.pert_names = sorted(mapping, key=lambda name: int(torch.argmax(mapping[name])))
    var_dims = folder / "var_dims.pkl"
    if var_dims.is_file():
        dims = read_var_dims(var_dims)
        if not info.pert_names and dims.get("pert_names") is not None:
            info.pert_names = [str(p) for p in dims["pert_names"]]
        if dims.get("gene_names") is not None:
            info.gene_names = [str(g) for g in np.asarray(dims["gene_names"]).tolist()]
        for key in ("input_dim", "output_dim", "pert_dim"):
            if key in dims and int(dims[key]) != getattr(info.config, key):
                raise ValueError(
                    f"var_dims.pkl says {key}={dims[key]} but the checkpoint has "
                    f"{getattr(info.config, key)}: the folder mixes files of different runs"
                )


def save_state_checkpoint(
    model: STModel, path: str | Path, extra_hparams: dict | None = None, state_dict=None
) -> Path:
    """Write ``model`` as a State-format Lightning checkpoint (with the pickled MSELoss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hparams = model.config.to_hparams()
    hparams.update(extra_hparams or {})
    hparams["loss_fn"] = torch.nn.MSELoss()
    hparams["transformer_backbone_kwargs"] = {
        k: v for k, v in hparams["transformer_backbone_kwargs"].items()
        if k != "bidirectional_attention"
    }  # fmt: skip
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()},
        "hyper_parameters": hparams,
    }
    torch.save(ckpt, path)
    return path


def write_model_folder(model: STModel, folder: str | Path, pert_names: list[str],
                       gene_names: list[str] | None = None) -> Path:  # fmt: skip
    """Write a model folder laid out like a State download (config.yaml, final.ckpt, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(str(p) for p in pert_names)
    cfg = model.config
    save_state_checkpoint(model, folder / "final.ckpt", {"pert_names": names})
    onehot = {name: torch.nn.functional.one_hot(torch.tensor(i), len(names)).float()
              for i, name in enumerate(names)}  # fmt: skip
    torch.save(onehot, folder / "pert_onehot_map.pt")
    var_dims = {"input_dim": cfg.input_dim, "output_dim": cfg.output_dim, "pert_dim": cfg.pert_dim,
                "pert_names": names, "gene_names": gene_names or []}  # fmt: skip
    with open(folder / "var_dims.pkl", "wb") as f:
        pickle.dump(var_dims, f)
    with open(folder / "config.yaml", "w") as f:
        yaml.safe_dump({"model": {"name": "state", "kwargs": cfg.to_hparams()}}, f)
    return folder
