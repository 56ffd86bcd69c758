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
    def __init__(self, dim, heads, recompute=False, backend="auto"):
        super().__init__()
        kw = {"recompute": recompute, "backend": backend}
        self.attn = MHCLayer(Attention(dim, heads), dim, N_STREAMS, **kw)
        self.mlp = MHCLayer(SwiGLU(dim, 4 * dim), dim, N_STREAMS, **kw)

    def forward(self, x):
        h = expand_streams(x, N_STREAMS)  # in a model: once before the first block
        return collapse_streams(self.mlp(self.attn(h)))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("dim,heads", [(512, 8), (1488, 12)], ids=["C512", "C1488"])
@pytest.mark.parametrize("variant", ["plain", "mhc", "mhc_all_triton"])
def test_block_fwd_bwd(benchmark, record, variant, dim, heads, dtype):
    """``mhc``: the default backends; ``mhc_all_triton``: every fused kernel, the opt-in
    projection and coefficient epilogue included (GPU only)."""
    if variant == "mhc_all_triton" and not ON_GPU:
        pytest.skip("the fused kernels run natively only on a GPU")
    torch.manual_seed(0)
    if variant == "plain":
        block = PlainBlock(dim, heads).to(DEVICE)
    else:
        backend = "triton" if variant == "mhc_all_triton" else "auto"
        block = MHCBlock(dim, heads, backend=backend).to(DEVICE)
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


def saved_storage_bytes(fn) -> int:
    """Bytes of distinct storages saved for backward while running ``fn`` (activation memory)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dim,heads", [(1488, 12)], ids=["C1488"])
def test_activation_memory(benchmark, record, dim, heads):
    """Issue 8: activation memory of plain, mHC and mHC with recomputation (same block, bf16
    autocast on GPU). Target: recomputation <= 1.2x the plain residual."""
    torch.manual_seed(0)
    sets = 16 if ON_GPU else 1
    x = torch.randn(sets, CELLS, dim, device=DEVICE)
    blocks = {"plain": PlainBlock(dim, heads), "mhc": MHCBlock(dim, heads),
              "mhc_recompute": MHCBlock(dim, heads, recompute=True)}  # fmt: skip
    memory = {}
    for name, block in blocks.items():
        block.to(DEVICE)
        memory[name] = saved_storage_bytes(lambda b=block: b(x))
    benchmark.pedantic(lambda: saved_storage_bytes(lambda: blocks["mhc_recompute"](x)), rounds=1)
    record(dim=dim, cells=CELLS, sets=sets, n_streams=N_STREAMS, activation_bytes=memory,
           mhc_vs_plain=memory["mhc"] / memory["plain"],
           recompute_vs_plain=memory["mhc_recompute"] / memory["plain"])  # fmt: skip
