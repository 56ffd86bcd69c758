"""Bidirectional, position-free transformer backbones for ST models, built with transformers.

ST-Tahoe's backbone is a Llama whose attention sees every cell of a set (no causal mask) and no
position (rotary cos = 1, sin = 0), so the model is permutation-equivariant over cells (FACTS.md §5).
State's GPT2 variant is built the same way (no causal mask, no position embeddings added).

Module names and ``state_dict`` keys are exactly transformers' ``LlamaModel`` / ``GPT2Model`` ones,
so State checkpoints load 1:1. The unused token-embedding table is dropped (``embed_tokens`` /
``wte`` are ``None``): inputs always arrive as ``inputs_embeds``.

mHC: :func:`enable_mhc` adds two :class:`mhc_kernels.HyperConnection` sites to each chosen decoder
layer, ``attn_hc`` around the attention sub-layer (pre-norm included) and ``mlp_hc`` around the MLP.
The pretrained sub-modules stay where they are, so their keys and LoRA target names do not move.
Streams are expanded once after the encoders and collapsed once before the final norm; a layer left
without mHC adds its branch, applied once to the stream mean, to every stream (the connection with
H_pre = 1/n, H_post = 1, H_res = I), so all streams stay in step there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from mhc_kernels import HyperConnection, MHCConfig, collapse_streams, expand_streams

BACKBONES = ("llama", "gpt2")


def backbone_key(name: str) -> str:
    """Normalise State's ``transformer_backbone_key`` ("llama", "LLaMA", "GPT2", ...)."""
    key = str(name).lower()
    if key not in BACKBONES:
        raise ValueError(
            f"transformer_backbone_key must be one of {BACKBONES} (any case), got {name!r}"
        )
    return key


class _StreamBackbone:
    """The decoder loop shared by both backbones: plain residuals, or mHC streams."""

    mhc_streams: int | None = None
    mhc_stream_dtype: torch.dtype | None = None  # None: the hidden states' dtype

    def _sublayers(self, layer, *context) -> tuple[Callable, Callable]:
        raise NotImplementedError

    def _blocks(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def _run_blocks(self, h: torch.Tensor, *context) -> torch.Tensor:
        n = self.mhc_streams
        if not n:
            for layer in self._blocks():
                for branch in self._sublayers(layer, *context):
                    h = h + branch(h)
            return h
        dtype = h.dtype
        h = expand_streams(h.to(self.mhc_stream_dtype or dtype), n)
        cast = h.dtype != dtype  # streams in another dtype: the branches compute in the model's
        for layer in self._blocks():
            for site, branch in zip(
                ("attn_hc", "mlp_hc"), self._sublayers(layer, *context), strict=True
            ):
                if cast:
                    branch = _computing_in(dtype, branch)
                if hasattr(layer, site):
                    h = getattr(layer, site).connect(h, branch)
                else:  # the mean in the wider of the two dtypes
                    mean = h.mean(dim=-2, dtype=torch.promote_types(h.dtype, dtype))
                    h = (h + branch(mean).unsqueeze(-2)).to(h.dtype)
        return collapse_streams(h.to(dtype))


def _computing_in(dtype: torch.dtype, branch: Callable) -> Callable:
    """``branch`` given its input in ``dtype``."""
    return lambda x: branch(x.to(dtype))


class BidirectionalLlama(_StreamBackbone, LlamaModel):
    """``LlamaModel`` without causal mask and without rotary positions; takes ``inputs_embeds``."""

    def __init__(self, config: LlamaConfig):
        config._attn_implementation = "sdpa"
        super().__init__(config)
        self.embed_tokens = None
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def _blocks(self):
        return self.layers

    def _sublayers(self, layer, position_embeddings):
        def attn(x):
            out, _ = layer.self_attn(layer.input_layernorm(x), position_embeddings, None)
            return out

        return attn, lambda x: layer.mlp(layer.post_attention_layernorm(x))

    def forward(self, inputs_embeds: torch.Tensor, **_) -> torch.Tensor:
        """``inputs_embeds: (B, S, hidden)`` -> ``(B, S, hidden)`` after the final RMSNorm."""
        head_dim = self.layers[0].self_attn.head_dim
        shape = (*inputs_embeds.shape[:-1], head_dim)
        cos = torch.ones(shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        position_free = (cos, torch.zeros_like(cos))  # rotary becomes the identity
        return self.norm(self._run_blocks(inputs_embeds, position_free))


class BidirectionalGPT2(_StreamBackbone, GPT2Model):
    """``GPT2Model`` without causal mask and without position embeddings; takes ``inputs_embeds``."""

    def __init__(self, config: GPT2Config):
        config._attn_implementation = "sdpa"
        super().__init__(config)
        self.wte = None
        for block in self.h:
            block.attn.is_causal = False

    def _blocks(self):
        return self.h

    def _sublayers(self, block):
        def attn(x):
            out, _ = block.attn(block.ln_1(x))
            return out

        return attn, lambda x: block.mlp(block.ln_2(x))

    def forward(self, inputs_embeds: torch.Tensor, **_) -> torch.Tensor:
        """``inputs_embeds: (B, S, n_embd)`` -> ``(B, S, n_embd)`` after the final LayerNorm."""
        return self.ln_f(self._run_blocks(self.drop(inputs_embeds)))


def build_backbone(key: str, kwargs: dict, hidden_dim: int) -> nn.Module:
    """Build the backbone named by State's ``transformer_backbone_key`` from its kwargs."""
    key = backbone_key(key)
    kwargs = {k: v for k, v in dict(kwargs).items() if k != "bidirectional_attention"}
    kwargs.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no token table
    if key == "llama":
        kwargs.setdefault("hidden_size", hidden_dim)
        kwargs["vocab_size"] = 1  # the token table is unused and dropped
        return BidirectionalLlama(LlamaConfig(**kwargs))
    kwargs.setdefault("n_embd", hidden_dim)
    kwargs["vocab_size"] = 1
    return BidirectionalGPT2(GPT2Config(**kwargs))


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (possibly peft-wrapped) backbone."""
    base = unwrap(backbone)
    return base.layers if isinstance(base, BidirectionalLlama) else base.h


def unwrap(backbone: nn.Module) -> _StreamBackbone:
    """The backbone itself, under a peft wrapper if there is one."""
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if get_base is not None else backbone


def enable_mhc(backbone: nn.Module, config: MHCConfig, layers: Iterable[int] | None = None,
               stream_dtype: torch.dtype | None = None) -> int:  # fmt: skip
    """Add ``attn_hc`` and ``mlp_hc`` sites to the chosen decoder layers (all by default), with
    streams in ``stream_dtype`` (``None``: the hidden states' dtype).

    Returns the number of sites added. The new parameters are trainable.
    """
    base = unwrap(backbone)
    blocks = decoder_layers(backbone)
    chosen = range(len(blocks)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"mhc.layers {bad} out of range: the backbone has {len(blocks)} layers")
    hidden = base.config.hidden_size if isinstance(base, BidirectionalLlama) else base.embed_dim
    param = next(base.parameters())
    for i in chosen:
        for site in ("attn_hc", "mlp_hc"):
            blocks[i].add_module(site, HyperConnection(hidden, config).to(param.device))
    base.mhc_streams = config.n_streams
    base.mhc_stream_dtype = stream_dtype
    return 2 * len(chosen)
