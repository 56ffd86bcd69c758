"""Turn a pretrained ST model into a fine-tunable one: new heads, LoRA (peft), mHC, trainability.

Order matters and is fixed here: the pretrained weights are already loaded (load_pretrained), then
heads are rebuilt for new data, then mHC sites are added, then peft wraps the backbone. State's own
path wraps with peft first and loads afterwards, which renames every backbone key and silently
trains LoRA on a random backbone (FACTS.md §5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from mhc_kernels import MHCConfig

from .backbones import enable_mhc
from .st import STModel, build_mlp

log = logging.getLogger("st_finetune")

DEFAULT_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"]}
MLP_TARGETS = {"llama": ["gate_proj", "up_proj", "down_proj"], "gpt2": ["c_fc"]}
HEADS = ("pert_encoder", "basal_encoder", "project_out")
STREAM_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoraSettings:
    """LoRA on the backbone (peft).

    Attributes:
        enable: add LoRA adapters.
        r: rank of the update ``B A``.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the LoRA input.
        target_modules: module names to adapt; ``None`` picks the attention projections of the
            backbone (``q/k/v/o_proj`` for Llama, ``c_attn, c_proj`` for GPT2).
        adapt_mlp: also adapt the MLP projections (``gate/up/down_proj`` or ``c_fc``).
    """

    enable: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None
    adapt_mlp: bool = False

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class MHCSettings:
    """mHC around each chosen decoder layer's attention and MLP sub-layers.

    Attributes:
        enable: add mHC sites.
        n_streams: expansion rate n.
        sinkhorn_iters: Sinkhorn-Knopp iterations for H_res.
        layers: decoder layer indices to wrap; ``None`` wraps all.
        init: ``"identity"`` (reproduces the pretrained model at step 0) or ``"paper"``.
        alpha_init: initial gates.
        backend: the mHC kernels' backend (``"auto"``, ``"torch"``, ``"triton"``: every fused
            Triton kernel, the projection included for any width).
        recompute: activation memory traded for compute: 0 keeps every activation; ``k >= 1``
            keeps one stream input per ``k`` consecutive connections and rebuilds the others in
            backward by re-running the merges (:mod:`mhc_kernels.recompute`; 3 or 4 suit
            ST-Tahoe's 12 connections). Results are the same.
        stream_dtype: the residual streams' dtype. ``"auto"`` (default): the hidden states',
            as a plain residual has it: bf16 under bf16 mixed precision (the GPU default; the
            encoders' output is bf16 there), float32 in float32 training. ``"float32"``: float32
            streams whatever the precision (twice bf16's memory and traffic). ``"bfloat16"``:
            bf16 streams in float32 training too (half the memory and traffic; every merge
            rounds the streams to bf16). The branches compute in the hidden states' dtype.
        extra: further :class:`mhc_kernels.MHCConfig` fields (``coeff_dtype`` by name, e.g.
            ``float64``).
    """

    enable: bool = False
    n_streams: int = 4
    sinkhorn_iters: int = 20
    layers: list[int] | None = None
    init: str = "identity"
    alpha_init: float = 0.01
    backend: str = "auto"
    recompute: int = 0
    stream_dtype: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stream_dtype not in STREAM_DTYPES:
            raise ValueError(f"mhc.stream_dtype must be one of {list(STREAM_DTYPES)}, got "
                             f"{self.stream_dtype!r}")  # fmt: skip
        self.mhc_config()  # every setting checked now, before any data is read

    def mhc_config(self) -> MHCConfig:
        k = self.recompute
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(
                f"mhc.recompute must be an integer >= 0 (0: keep every activation, k: keep one "
                f"stream input per k connections), got {k!r}"
            )
        own = {"n_streams": self.n_streams, "sinkhorn_iters": self.sinkhorn_iters,
               "init": self.init, "alpha_init": self.alpha_init, "backend": self.backend,
               "recompute": k > 0, "recompute_block": max(k, 1)}  # fmt: skip
        fields = {f.name for f in dataclasses.fields(MHCConfig)} - own.keys()
        unknown = [key for key in self.extra if key not in fields]
        if unknown:
            colon = any(":" in str(key) for key in unknown)
            raise ValueError(
                f"mhc.extra: {unknown} are not MHCConfig fields it may set; choose from "
                f"{sorted(fields)} (the others are mhc.* settings of their own)"
                + ("; YAML needs a space after the colon: {fused_backward: true}" if colon else "")
            )
        extra = dict(self.extra)
        if isinstance(extra.get("coeff_dtype"), str):  # YAML and the manifest: "float64"
            name = extra["coeff_dtype"].removeprefix("torch.")
            extra["coeff_dtype"] = getattr(torch, name, extra["coeff_dtype"])
        return MHCConfig(**own, **extra)


def adapt_heads(model: STModel, input_dim: int, pert_names: list[str],
                pretrained_perts: list[str], announce: bool = True) -> list[str]:  # fmt: skip
    """Rebuild the heads that cannot serve the new data; returns the rebuilt module names.

    A different feature dimension rebuilds ``basal_encoder`` and ``project_out`` (input and output
    are the same space: we predict perturbed cells from control cells). A different perturbation
    vocabulary rebuilds ``pert_encoder``. The backbone is always kept. ``announce=False`` (loading
    a fine-tuned model, whose heads come back trained) logs at debug level only.
    """
    c = model.config
    rebuilt = []
    level = logging.INFO if announce else logging.DEBUG
    if input_dim != c.input_dim or input_dim != c.output_dim:
        log.log(
            level,
            "feature dimension %d differs from the checkpoint's (in %d, out %d): rebuilding "
            "basal_encoder and project_out, trained in full; the backbone is kept",
            input_dim, c.input_dim, c.output_dim,
        )  # fmt: skip
        model.basal_encoder = build_mlp(input_dim, c.hidden_dim, c.hidden_dim,
                                        c.n_encoder_layers, c.dropout)  # fmt: skip
        model.project_out = build_mlp(c.hidden_dim, c.hidden_dim, input_dim,
                                      c.n_decoder_layers, c.dropout)  # fmt: skip
        c.input_dim = c.output_dim = input_dim
        rebuilt += ["basal_encoder", "project_out"]
    if sorted(pert_names) != sorted(pretrained_perts):
        log.log(
            level,
            "perturbations %s are not the checkpoint's vocabulary (%d names): new pert_encoder "
            "(%d -> %d), trained in full",
            sorted(pert_names)[:6], len(pretrained_perts), len(pert_names), c.hidden_dim,
        )  # fmt: skip
        model.pert_encoder = build_mlp(len(pert_names), c.hidden_dim, c.hidden_dim,
                                       c.n_encoder_layers, c.dropout)  # fmt: skip
        c.pert_dim = len(pert_names)
        rebuilt.append("pert_encoder")
    return rebuilt


def add_mhc(model: STModel, settings: MHCSettings, announce: bool = True) -> int:
    """Add mHC sites to the backbone; returns how many (logged unless ``announce=False``)."""
    sites = enable_mhc(model.transformer_backbone, settings.mhc_config(), settings.layers,
                       STREAM_DTYPES[settings.stream_dtype])  # fmt: skip
    log.log(logging.INFO if announce else logging.DEBUG,
            "mHC: %d sites (n=%d, %d Sinkhorn iterations, %s streams)", sites,
            settings.n_streams, settings.sinkhorn_iters, settings.stream_dtype)  # fmt: skip
    return sites


def add_lora(model: STModel, settings: LoraSettings) -> None:
    """Wrap the (already loaded) backbone with peft LoRA adapters."""
    key = model.config.transformer_backbone_key
    targets = list(settings.target_modules or DEFAULT_TARGETS[key])
    if settings.adapt_mlp:
        targets += [t for t in MLP_TARGETS[key] if t not in targets]
    names = [name for name, module in model.transformer_backbone.named_modules()
             if isinstance(module, nn.Linear | Conv1D)]  # fmt: skip
    linear = sorted({name.rsplit(".", 1)[-1] for name in names})
    # peft matches a target against the end of a module's dotted name
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not layers of the {key} backbone; "
                         f"its linear layers: {linear}")  # fmt: skip
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, fan_in_fan_out=key == "gpt2", bias="none")  # fmt: skip
    with quiet_peft():
        model.transformer_backbone = get_peft_model(model.transformer_backbone, config)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrapping a model with peft reads ``is_gradient_checkpointing``, which transformers 5
    deprecates: a FutureWarning at every wrap that a user of st_finetune cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        yield


def is_mhc_param(name: str) -> bool:
    return ".attn_hc." in name or ".mlp_hc." in name


def is_lora_param(name: str) -> bool:
    return "lora_" in name


def set_trainable(model: STModel, rebuilt: list[str], everything: bool = False) -> dict:
    """LoRA adapters, mHC coefficients and rebuilt heads train; everything else is frozen, unless
    ``everything`` (a new model: no pretrained weights to keep, so all of them train).

    Returns ``{"trainable": int, "total": int, "percent": float}`` and logs one line.
    """
    for name, param in model.named_parameters():
        param.requires_grad = everything or (
            is_lora_param(name) or is_mhc_param(name) or name.split(".")[0] in rebuilt
        )
    return parameter_report(model)


def parameter_report(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
             report["percent"])  # fmt: skip
    return report


def prepare_for_finetuning(
    model: STModel,
    *,
    input_dim: int,
    pert_names: list[str],
    pretrained_perts: list[str],
    lora: LoraSettings,
    mhc: MHCSettings,
    new_model: bool = False,
) -> tuple[list[str], dict]:
    """Heads, then mHC, then LoRA, then the trainability rule; returns (rebuilt heads, report).

    ``new_model``: the weights are an initialisation, not pretrained ones: every parameter trains
    (LoRA on a random frozen backbone would train adapters on noise, FACTS.md §5).
    """
    rebuilt = adapt_heads(model, input_dim, pert_names, pretrained_perts)
    if mhc.enable:
        add_mhc(model, mhc)
    if lora.enable:
        add_lora(model, lora)
        if new_model:
            log.warning("lora.enable=true on a new model: its weights are not pretrained, so every "
                        "parameter trains and the adapters add nothing but parameters")  # fmt: skip
    return rebuilt, set_trainable(model, rebuilt, everything=new_model)
