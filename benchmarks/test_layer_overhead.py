"""MHCLayer overhead over a plain residual on a Llama-style block (issue 3).

The same pre-norm attention + SwiGLU MLP block runs as ``x + F(x)`` twice (plain) or with both
sub-layers wrapped in MHCLayer with n = 4 streams; 256-cell sets, fwd+bwd, same run, same data.
Target: overhead <= 25% on CPU and <= 15% on GPU for C = 1488 (ST-Tahoe's width).
"""

from __future__ import annotations

import pytest
import torch
from blocks import Attention, SwiGLU
from conftest import DEVICE, ON_GPU, synchronized, timed
from torch import nn

from mhc_kernels import MHCLayer, collapse_streams, expand_streams

CELLS = 256
N_STREAMS = 4
LAYERS = 6  # ST-Tahoe's depth: 12 connections
# the paper's L_r = sqrt(n L / (n + 2)) for n = 4 and L = 12 connections is 2.8; sqrt(L) = 3.5
BLOCKS = (3, 4)


class Stack(nn.Module):
    """``layers`` pre-norm attention + SwiGLU blocks, plain residuals or mHC around every
    sub-layer, the streams expanded once and collapsed once (in a model: once for all blocks)."""

    def __init__(self, dim, heads, layers=1, mhc=True, stream_dtype=None, **options):
        super().__init__()
        self.stream_dtype = stream_dtype  # the streams' dtype (default: the input's)
        attn = [Attention(dim, heads) for _ in range(layers)]
        mlp = [SwiGLU(dim, 4 * dim) for _ in range(layers)]
        if mhc:
            attn = [MHCLayer(a, dim, N_STREAMS, **options) for a in attn]
            mlp = [MHCLayer(m, dim, N_STREAMS, **options) for m in mlp]
        self.mhc, self.attn, self.mlp = mhc, nn.ModuleList(attn), nn.ModuleList(mlp)

    def forward(self, x):
        if not self.mhc:  # the residual in stream_dtype too (bf16: as ST's under bf16 autocast)
            h = x.to(self.stream_dtype or x.dtype)
            for attn, mlp in zip(self.attn, self.mlp, strict=True):
                h = h + attn(h)
                h = h + mlp(h)
            return h.to(x.dtype)
        h = expand_streams(x.to(self.stream_dtype or x.dtype), N_STREAMS)
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            h = mlp(attn(h))
        return collapse_streams(h).to(x.dtype)


VARIANTS = ["plain", "mhc", "mhc_recompute", "mhc_fused_backward", "mhc_all_triton",
            "mhc_all_triton_fused", "plain_bf16_residual", "mhc_bf16_streams", "plain_compiled",
            "mhc_compiled", "mhc_all_triton_compiled", "plain_graphed", "mhc_graphed",
            # which path costs the GPU least, host aside (the bf16 block is bound by its host)
            "mhc_fused_backward_graphed", "mhc_all_triton_graphed", "mhc_all_triton_fused_graphed",
            "plain_bf16_residual_graphed", "mhc_bf16_streams_graphed",
            # st_finetune's bf16 streams with every fused kernel: the Triton projection reads them
            # as they are, where PyTorch's makes a float32 copy each way
            "mhc_bf16_streams_all_triton_graphed",
            "mhc_bf16_streams_all_triton_fused_graphed",
            # with every launch prepared for 16-bit streams and not shipped (untimed): the default
            # path (st_finetune's) and every fused kernel with the fused backward
            "mhc_bf16_streams_candidates_graphed",
            "mhc_bf16_streams_all_triton_fused_candidates_graphed"]  # fmt: skip


def use_candidates(monkeypatch) -> None:
    """Every launch prepared for 16-bit streams and not shipped, in place of the shipped ones: the
    projection's ``CANDIDATE_TILES`` (the forward in 64 x 32 wgmma tiles with its sum of squares
    apart, ``dphi`` reading dproj's parts), the merge backward on tensor cores (``MERGE_MMA``) and
    the stream gradient's loads copied a step ahead (``STREAM_GRAD_STAGES = 2``): one graphed
    figure for all of them beside the shipped launches' in the same run."""
    from mhc_kernels.coefficients import triton as ct
    from mhc_kernels.streams import triton as st

    for label in ("fwd-64x32-sumsq-apart", "dphi-16x128-dproj-parts"):
        kernel, tiles = ct.CANDIDATE_TILES[label]
        monkeypatch.setitem(ct.GPU_TILES, (kernel, 2), tiles)
    monkeypatch.setattr(st, "MERGE_MMA", True)
    monkeypatch.setattr(st, "STREAM_GRAD_STAGES", 2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("dim,heads", [(512, 8), (1488, 12)], ids=["C512", "C1488"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_block_fwd_bwd(benchmark, record, variant, dim, heads, dtype, monkeypatch):
    """``mhc``: the default backends; ``mhc_recompute``: both connections recomputed, the second
    one's stream rebuilt (``recompute_block=2``); ``mhc_all_triton``: every fused kernel, the
    projection at any width included (GPU only; ``auto`` takes it too for n*C >= 4096);
    ``mhc_fused_backward``: the default backends with the connection's stream gradient in one
    pass (``fused_backward``),
    ``mhc_all_triton_fused`` every fused kernel with it (GPU only); ``mhc_bf16_streams``: the
    default backends with the streams kept in bf16 under bf16 autocast (half the streams' bytes:
    benchmarks/README.md, what the layer-overhead target allows), against ``plain_bf16_residual``:
    both what st_finetune runs under bf16 mixed precision, where the encoders hand the backbone
    bf16 hidden states, so the residual (or the streams) stays bf16; ``*_compiled``: the block under
    ``torch.compile`` (GPU only), which takes the host's dispatch cost out of a launch-bound
    block, as a training loop can (``mhc_compiled``: the default backends, ``mhc_all_triton_compiled``
    with the fused projection too, the fused kernels as custom ops); ``*_graphed``: the block's
    forward and backward each replayed as one CUDA graph (``torch.cuda.make_graphed_callables``,
    GPU only), which leaves the host out: the GPU's own time, what mHC costs a step that is not
    bound by its host, for the default path, the fused backward, every fused kernel (with and
    without the fused backward) and bf16 streams against a bf16 residual (also with every fused
    kernel, with and without the fused backward: ``mhc_bf16_streams_all_triton[_fused]``); and
    ``*_candidates``: the same with the launches not shipped yet (:func:`use_candidates`)."""
    if variant.startswith("mhc_all_triton") or variant.endswith(("_compiled", "_graphed")):
        if not ON_GPU:
            pytest.skip("the fused kernels, inductor's code and CUDA graphs run only on a GPU")
    name = variant.removesuffix("_compiled").removesuffix("_graphed")
    if name.startswith(("mhc_bf16_streams", "plain_bf16_residual")) and dtype != "bf16":
        pytest.skip("bf16 streams are measured in the bf16 autocast block")
    if name.endswith("_candidates"):
        use_candidates(monkeypatch)
        name = name.removesuffix("_candidates")
    torch.manual_seed(0)
    options = {"mhc": {}, "mhc_recompute": {"recompute": True, "recompute_block": 2},
               "mhc_fused_backward": {"fused_backward": True},
               "mhc_all_triton": {"backend": "triton"},
               "mhc_all_triton_fused": {"backend": "triton", "fused_backward": True},
               "mhc_bf16_streams": {"stream_dtype": torch.bfloat16},
               "mhc_bf16_streams_all_triton": {"stream_dtype": torch.bfloat16, "backend": "triton"},
               "mhc_bf16_streams_all_triton_fused": {"stream_dtype": torch.bfloat16,
                                                     "backend": "triton", "fused_backward": True},
               "plain_bf16_residual": {"stream_dtype": torch.bfloat16}}  # fmt: skip
    block = Stack(dim, heads, mhc=not name.startswith("plain"), **options.get(name, {})).to(DEVICE)
    if variant.endswith("_compiled"):
        block = torch.compile(block)
    sets = 16 if ON_GPU else 1
    x = torch.randn(sets, CELLS, dim, device=DEVICE)
    # a graphed callable runs under autocast only with autocast's weight cache off (its docs)
    graphed = variant.endswith("_graphed")
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16",
                              cache_enabled=not graphed)  # fmt: skip
    if graphed:
        with autocast:
            block = torch.cuda.make_graphed_callables(block, (x,))

    def run():
        with autocast:
            loss = block(x).float().pow(2).mean()
        loss.backward()

    run = synchronized(run)
    run()
    benchmark.pedantic(run, rounds=10 if ON_GPU else 7, warmup_rounds=2)
    record(variant=variant, dim=dim, cells=CELLS, sets=sets, n_streams=N_STREAMS, dtype=dtype)


def connection_traffic(n: int, C: int) -> int:
    """Elements per token a connection must move, forward + backward, with one pass per kernel of
    the fused design: forward projection n C, pre-mix (n + 1) C, merge (2n + 1) C; backward merge
    without dx (2n + 2) C, dH_pre (n + 1) C, stream gradient (3n + 1) C, phi's gradient n C."""
    return (4 * n + 2) * C + (7 * n + 4) * C


@pytest.mark.parametrize("dtype", ["fp32", "bf16"] if ON_GPU else ["fp32"])
@pytest.mark.parametrize("backend", ["auto", "triton"] if ON_GPU else ["auto"])
@pytest.mark.parametrize("fused", [False, True], ids=["autograd_sum", "fused_backward"])
def test_connection_fwd_bwd(benchmark, record, fused, backend, dtype):
    """One connection alone (identity branch), C = 1488, n = 4, fwd+bwd with every gradient:
    what mHC itself costs, the branch's time left out. ``fused_backward`` against autograd adding
    the three stream gradients; ``triton``: every kernel by name (since the fourth H200 lease
    ``auto`` takes the same at this width, the Triton projection included). The roofline ratio
    is against :func:`connection_traffic` (the fused design's passes)."""
    dim, tokens = 1488, (16 if ON_GPU else 4) * CELLS
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    layer = MHCLayer(nn.Identity(), dim, N_STREAMS, init="paper", backend=backend,
                     fused_backward=fused).to(DEVICE)  # fmt: skip
    x = torch.randn(tokens, N_STREAMS, dim, device=DEVICE).to(dt)
    upstream = torch.randn_like(x)
    params = [layer.phi, layer.bias, layer.alpha]
    nbytes = connection_traffic(N_STREAMS, dim) * tokens * x.element_size()
    # 15 rounds on CPU: this machine's spread between calls is as large as the difference
    _, facts = timed(benchmark, lambda x, *_: layer(x), [x, *params], upstream, "fwd+bwd", nbytes,
                     cpu_rounds=15)  # fmt: skip
    record(kernel="connection", fused_backward=fused, backend=backend, dtype=dtype, dim=dim,
           tokens=tokens, n_streams=N_STREAMS, **facts)  # fmt: skip


WEIGHT_VIEWS = ("TBackward0", "ToCopyBackward0", "ViewBackward0", "TransposeBackward0")


def is_weight(t: torch.Tensor) -> bool:
    """A parameter, a view of one, or autocast's low-precision copy of one: a chain of views and
    casts back to a leaf that needs grad (the benchmark's inputs do not)."""
    node = t.grad_fn
    while (
        node is not None and type(node).__name__ in WEIGHT_VIEWS and len(node.next_functions) == 1
    ):
        node = node.next_functions[0][0]
    return t.requires_grad if t.grad_fn is None else type(node).__name__ == "AccumulateGrad"


def saved_storage_bytes(fn) -> int:
    """Bytes of distinct storages saved for backward while running ``fn``: activation memory,
    what grows with the tokens. Weights (parameters and autocast's copies of them) are left out."""
    storages = {}

    def pack(t):
        if not is_weight(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


MEMORY_VARIANTS = {
    "plain": {"mhc": False},
    "mhc": {},
    "mhc_recompute": {"recompute": True},
    "mhc_fused_backward": {"fused_backward": True},
    **{f"mhc_recompute_block{k}": {"recompute": True, "recompute_block": k} for k in BLOCKS},
}


def peak_step_bytes(block, x, autocast) -> int:
    """GPU only: peak memory allocated during one fwd+bwd step above what was allocated before
    (weights, input; gradients are freed first), rebuilt streams and gradients included."""
    block.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with autocast:
        loss = block(x).float().pow(2).mean()
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim,heads", [(1488, 12)], ids=["C1488"])
def test_activation_memory(benchmark, record, dim, heads, dtype):
    """Issue 8: activation memory (bytes saved for backward, weights left out) of a 6-layer
    ST-Tahoe-shaped stack: plain residuals, mHC, mHC recomputed per connection and recomputed in
    blocks of k connections (bf16: autocast, as the trainer runs on a GPU; also with bf16 streams
    and residual). On a GPU the peak of a whole fwd+bwd step is measured too (it includes the up
    to k - 1 rebuilt streams).
    Target: recomputation <= 1.2x the plain residual (ratios: summarize.py)."""
    torch.manual_seed(0)
    sets = 16 if ON_GPU else 1
    x = torch.randn(sets, CELLS, dim, device=DEVICE)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    saved, peak = {}, {}
    variants = dict(MEMORY_VARIANTS)
    if dtype == "bf16":  # streams in bf16 too (the branch computes under autocast)
        variants |= {"plain_bf16_residual": {"mhc": False, "stream_dtype": torch.bfloat16},
                     "mhc_bf16_streams": {"stream_dtype": torch.bfloat16},
                     f"mhc_bf16_streams_recompute_block{BLOCKS[-1]}": {
                         "stream_dtype": torch.bfloat16, "recompute": True,
                         "recompute_block": BLOCKS[-1]}}  # fmt: skip
    for name, options in variants.items():
        block = Stack(dim, heads, LAYERS, **options).to(DEVICE)
        with autocast:
            saved[name] = saved_storage_bytes(lambda b=block: b(x))
        if ON_GPU:
            peak[name] = peak_step_bytes(block, x, autocast)
        del block
    lean = Stack(dim, heads, LAYERS, recompute=True, recompute_block=BLOCKS[0]).to(DEVICE)
    with autocast:
        benchmark.pedantic(lambda: saved_storage_bytes(lambda: lean(x)), rounds=1)
    record(dim=dim, cells=CELLS, sets=sets, n_streams=N_STREAMS, layers=LAYERS, dtype=dtype,
           saved_bytes=saved, peak_step_bytes=peak,
           stream_bytes=sets * CELLS * N_STREAMS * dim * 4)  # fmt: skip
