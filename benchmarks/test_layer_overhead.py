"""MHCLayer overhead over a plain residual on a Llama-style block (issue 3).

The same pre-norm attention + SwiGLU MLP block runs as ``x + F(x)`` twice (plain) or with both
sub-layers wrapped in MHCLayer with n = 4 streams; 256-cell sets, fwd+bwd, same run, same data.
Target: overhead <= 25% on CPU and <= 15% on GPU for C = 1488 (ST-Tahoe's width).
"""

from __future__ import annotations

import pytest
import torch
from blocks import Attention, SwiGLU
from conftest import DEVICE, ON_GPU, synchronized
from torch import nn

from mhc_kernels import MHCLayer, collapse_streams, expand_streams

CELLS = 256
N_STREAMS = 4


class PlainBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn, self.mlp = Attention(dim, heads), SwiGLU(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class MHCBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = MHCLayer(Attention(dim, heads), dim, N_STREAMS)
        self.mlp = MHCLayer(SwiGLU(dim, 4 * dim), dim, N_STREAMS)

    def forward(self, x):
        h = expand_streams(x, N_STREAMS)  # in a model: once before the first block
        return collapse_streams(self.mlp(self.attn(h)))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("dim,heads", [(512, 8), (1488, 12)], ids=["C512", "C1488"])
@pytest.mark.parametrize("variant", ["plain", "mhc"])
def test_block_fwd_bwd(benchmark, record, variant, dim, heads, dtype):
    torch.manual_seed(0)
    block = (PlainBlock if variant == "plain" else MHCBlock)(dim, heads).to(DEVICE)
    sets = 16 if ON_GPU else 1
    x = torch.randn(sets, CELLS, dim, device=DEVICE)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def run():
        with autocast:
            loss = block(x).float().pow(2).mean()
        loss.backward()

    run = synchronized(run)
    run()
    benchmark.pedantic(run, rounds=10 if ON_GPU else 7, warmup_rounds=2)
    record(variant=variant, dim=dim, cells=CELLS, sets=sets, n_streams=N_STREAMS, dtype=dtype)
