"""Llama-style residual branches shared by the benchmarks (pre-norm included, no skip connection)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """RMSNorm -> multi-head self-attention (bidirectional unless ``causal``)."""

    def __init__(self, dim: int, heads: int, causal: bool = False, eps: float | None = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.heads = heads
        self.causal = causal

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        y = F.scaled_dot_product_attention(
            *(t.transpose(-2, -3) for t in (q, k, v)), is_causal=self.causal
        )
        return self.out(y.transpose(-2, -3).flatten(-2))


class SwiGLU(nn.Module):
    """RMSNorm -> gated MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MLP(nn.Module):
    """RMSNorm -> Linear -> GELU -> Linear (4x wide)."""

    def __init__(self, dim: int, eps: float | None = None):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))
