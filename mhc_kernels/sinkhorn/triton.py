"""Fused Triton Sinkhorn-Knopp: one forward kernel and one exact backward kernel.

The maths is in ``reference.py``; these kernels run the same recurrence, operation for operation.

Limits. Matrices up to 16x16 are the design point (any n works; tiles are padded to the next power
of two, so register use grows as n^2). Input float32, float16 or bfloat16, iterations in float32.
Each program is persistent: it walks over blocks of ``BLOCK`` matrices, each held as a
``[BLOCK, NP, NP]`` tile, so every matrix is read once and written once.

Memory/compute trade-off. Forward: reads X, writes P; nothing saved. Backward: reads X and dL/dP,
recomputes the forward once while writing its ``2 * iters`` normaliser vectors to a per-program
scratch slot (``2 * iters * NP`` floats per matrix in flight, reused block after block so it stays
in L2), then walks back with the division-free adjoint and writes dL/dX. Work is about twice the
forward's; traffic is 3 matrices per matrix. Small batches (under ~64k matrices) are latency-bound.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._autograd import differentiable
from .._host import cdiv, multiprocessors, next_power_of_2
from .reference import ORDER_DIMS

# --------------------------------------------------------------------------------------- kernels


@triton.jit
def _kernel_matrix(x, FIRST: tl.constexpr):
    # x: [BLOCK, NP, NP]; shift along the first-normalised axis, fully -inf lines give zeros
    shift = tl.max(x, axis=FIRST)
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    return tl.exp(x - tl.expand_dims(shift, FIRST))


@triton.jit
def _normalise(a, AXIS: tl.constexpr, eps):
    s = tl.sum(a, axis=AXIS) + eps  # [BLOCK, NP]
    return a * tl.expand_dims(1.0 / s, AXIS), s  # NP divisions per matrix instead of NP^2


@triton.jit
def sinkhorn_tile_fwd(x, iters, eps, FIRST: tl.constexpr, SECOND: tl.constexpr):
    """P for one ``[BLOCK, NP, NP]`` tile of logits (padding ``-inf``); padded entries give 0."""
    a = _kernel_matrix(x, FIRST)
    for _ in range(iters):
        a, _s = _normalise(a, FIRST, eps)
        a, _s = _normalise(a, SECOND, eps)
    return a


@triton.jit
def sinkhorn_tile_recompute(x, slot, iters, eps, FIRST: tl.constexpr, SECOND: tl.constexpr,
                            BLOCK: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    """Backward, first half: P for one tile of logits, writing the ``2 * iters`` normalisers to
    ``slot`` (``[2 * iters, BLOCK, NP]`` floats, this program's)."""
    s_offs = tl.arange(0, BLOCK)[:, None] * NP + tl.arange(0, NP)[None, :]  # [BLOCK, NP]
    b = _kernel_matrix(x, FIRST)
    tl.debug_barrier()  # the previous tile's reads of the slot are done
    for it in range(iters):
        b, s = _normalise(b, FIRST, eps)
        tl.store(slot + (2 * it) * BLOCK * NP + s_offs, s)
        b, s = _normalise(b, SECOND, eps)
        tl.store(slot + (2 * it + 1) * BLOCK * NP + s_offs, s)
    return b


@triton.jit
def sinkhorn_tile_walk_back(b, g, slot, iters, FIRST: tl.constexpr, SECOND: tl.constexpr,
                            BLOCK: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    """Backward, second half: dL/dX from P (``b``), the upstream gradient ``g`` (padding 0) and
    the normalisers in ``slot``, with the division-free adjoint."""
    s_offs = tl.arange(0, BLOCK)[:, None] * NP + tl.arange(0, NP)[None, :]
    h = g * b  # h = dL/dA * A
    tl.debug_barrier()  # the normalisers are visible to every thread of the program
    for it in range(iters):
        step = 2 * (iters - 1 - it)
        h = h - b * tl.expand_dims(tl.sum(h, axis=SECOND), SECOND)
        s = tl.load(slot + (step + 1) * BLOCK * NP + s_offs)
        b = b * tl.expand_dims(s, SECOND)
        h = h - b * tl.expand_dims(tl.sum(h, axis=FIRST), FIRST)
        s = tl.load(slot + step * BLOCK * NP + s_offs)
        b = b * tl.expand_dims(s, FIRST)
    return h


@triton.jit
def _sinkhorn_fwd_kernel(
    x_ptr, p_ptr, num_mats, n,
    stride_xb, stride_xr, stride_xc,
    iters, eps,
    FIRST: tl.constexpr, SECOND: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_mats, BLOCK)
    rows = tl.arange(0, NP)[None, :, None]
    cols = tl.arange(0, NP)[None, None, :]
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        mats = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None, None]  # [BLOCK, 1, 1]
        mask = (mats < num_mats) & (rows < n) & (cols < n)
        x_offs = mats * stride_xb + rows * stride_xr + cols * stride_xc
        x = tl.load(x_ptr + x_offs, mask=mask, other=float("-inf")).to(tl.float32)
        a = sinkhorn_tile_fwd(x, iters, eps, FIRST, SECOND)  # [BLOCK, NP, NP]
        p_offs = mats * n * n + rows * n + cols
        tl.store(p_ptr + p_offs, a.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(
    x_ptr, g_ptr, dx_ptr, scratch_ptr, num_mats, n,
    stride_xb, stride_xr, stride_xc,
    stride_gb, stride_gr, stride_gc,
    iters, eps,
    FIRST: tl.constexpr, SECOND: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_mats, BLOCK)
    rows = tl.arange(0, NP)[None, :, None]
    cols = tl.arange(0, NP)[None, None, :]
    # this program's scratch slot: [2 * iters, BLOCK, NP] normalisers
    slot = scratch_ptr + pid.to(tl.int64) * (2 * iters * BLOCK * NP)
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        mats = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None, None]
        mask = (mats < num_mats) & (rows < n) & (cols < n)
        x_offs = mats * stride_xb + rows * stride_xr + cols * stride_xc
        x = tl.load(x_ptr + x_offs, mask=mask, other=float("-inf")).to(tl.float32)
        b = sinkhorn_tile_recompute(x, slot, iters, eps, FIRST, SECOND, BLOCK, NP)
        g_offs = mats * stride_gb + rows * stride_gr + cols * stride_gc
        g = tl.load(g_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        h = sinkhorn_tile_walk_back(b, g, slot, iters, FIRST, SECOND, BLOCK, NP)
        dx_offs = mats * n * n + rows * n + cols
        tl.store(dx_ptr + dx_offs, h.to(dx_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------- launchers

GPU_TILE_ELEMS = 2048  # elements of one [BLOCK, NP, NP] tile on a GPU (16 per thread at 4 warps)
GPU_TILE_ELEMS_N16 = 1024  # 16x16 matrices: larger tiles or 4+ warps spill a few bytes (ptxas -v)
INTERPRETER_TILE_ELEMS = 2**16  # the interpreter's cost is per program step: use huge tiles
NUM_WARPS = 4


@functools.cache
def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter: decided once, as ``@triton.jit`` decided
    it when this module was imported (not re-read from the environment on every launch)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gpu_tile(np2: int) -> int:
    return GPU_TILE_ELEMS_N16 if np2 >= 16 else GPU_TILE_ELEMS


def num_warps(np2: int) -> int:
    return 2 if np2 >= 16 else NUM_WARPS


def launch_config(num_mats: int, n: int, device: torch.device, tile: int | None = None
                  ) -> tuple[int, int, int]:  # fmt: skip
    """``(BLOCK, NP, programs)`` for ``num_mats`` matrices of size ``n`` on ``device``; ``tile``
    (elements of a ``[BLOCK, NP, NP]`` tile on a GPU) defaults to this kernel's."""
    np2 = next_power_of_2(n)
    tile = INTERPRETER_TILE_ELEMS if interpreting() else tile or _gpu_tile(np2)
    block = max(1, min(tile // (np2 * np2), next_power_of_2(num_mats)))
    num_blocks = cdiv(num_mats, block)
    if device.type == "cuda":
        max_programs = 8 * multiprocessors(device)
    else:
        max_programs = 2
    return block, np2, max(1, min(num_blocks, max_programs))


def order_axes(order: str) -> tuple[int, int]:
    # tensor dims (-2, -1) are tile axes (1, 2)
    return tuple(3 + d for d in ORDER_DIMS[order])


def sinkhorn_fwd(x: torch.Tensor, iters: int, order: str, eps: float) -> torch.Tensor:
    """x: (B, n, n) any strides -> P: (B, n, n) contiguous, dtype of x."""
    num_mats, n = x.shape[0], x.shape[-1]
    out = torch.empty((num_mats, n, n), dtype=x.dtype, device=x.device)
    if num_mats == 0:
        return out
    block, np2, programs = launch_config(num_mats, n, x.device)
    first, second = order_axes(order)
    _sinkhorn_fwd_kernel[(programs,)](
        x, out, num_mats, n, *x.stride(), iters, eps,
        FIRST=first, SECOND=second, BLOCK=block, NP=np2, num_warps=num_warps(np2),
    )  # fmt: skip
    return out


def sinkhorn_bwd(
    x: torch.Tensor, grad: torch.Tensor, iters: int, order: str, eps: float
) -> torch.Tensor:
    """x, grad: (B, n, n) any strides -> dL/dx: (B, n, n) contiguous, dtype of x."""
    num_mats, n = x.shape[0], x.shape[-1]
    dx = torch.empty((num_mats, n, n), dtype=x.dtype, device=x.device)
    if num_mats == 0:
        return dx
    block, np2, programs = launch_config(num_mats, n, x.device)
    scratch = torch.empty(programs * 2 * iters * block * np2, dtype=torch.float32, device=x.device)
    first, second = order_axes(order)
    _sinkhorn_bwd_kernel[(programs,)](
        x, grad, dx, scratch, num_mats, n, *x.stride(), *grad.stride(), iters, eps,
        FIRST=first, SECOND=second, BLOCK=block, NP=np2, num_warps=num_warps(np2),
    )  # fmt: skip
    return dx


def shipped_configs(dtypes=("fp32", "bf16", "fp16"), orders=tuple(ORDER_DIMS)):
    """Every GPU kernel configuration the launchers can pick, for ahead-of-time compile checks.

    Yields ``(name, kernel, signature, constexprs, launch options)``.
    """
    for np2 in (1, 2, 4, 8, 16):
        block = max(1, _gpu_tile(np2) // (np2 * np2))
        for dtype in dtypes:
            for order in orders:
                first, second = order_axes(order)
                consts = {"FIRST": first, "SECOND": second, "BLOCK": block, "NP": np2}
                ints = dict.fromkeys(["num_mats", "n"], "i32")
                x_strides = dict.fromkeys(["stride_xb", "stride_xr", "stride_xc"], "i32")
                g_strides = dict.fromkeys(["stride_gb", "stride_gr", "stride_gc"], "i32")
                tail = {"iters": "i32", "eps": "fp32", **dict.fromkeys(consts, "constexpr")}
                fwd = {"x_ptr": f"*{dtype}", "p_ptr": f"*{dtype}", **ints, **x_strides, **tail}
                bwd = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}",
                       "scratch_ptr": "*fp32", **ints, **x_strides, **g_strides, **tail}  # fmt: skip
                tag = f"NP{np2}-B{block}-{dtype}-{order}"
                launch = {"num_warps": num_warps(np2)}
                yield f"fwd-{tag}", _sinkhorn_fwd_kernel, fwd, consts, launch
                yield f"bwd-{tag}", _sinkhorn_bwd_kernel, bwd, consts, launch


# ------------------------------------------------------------------- autograd (as custom ops)
# Custom ops keep torch.compile from tracing into the launchers (no graph breaks); eager calls skip
# their dispatch cost (mhc_kernels/_autograd.py).


@torch.library.custom_op("mhc_kernels::sinkhorn_fwd", mutates_args=())
def _sinkhorn_fwd_op(x: torch.Tensor, iters: int, order: str, eps: float) -> torch.Tensor:
    return sinkhorn_fwd(x, iters, order, eps)


@_sinkhorn_fwd_op.register_fake
def _(x, iters, order, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("mhc_kernels::sinkhorn_bwd", mutates_args=())
def _sinkhorn_bwd_op(
    x: torch.Tensor, grad: torch.Tensor, iters: int, order: str, eps: float
) -> torch.Tensor:
    return sinkhorn_bwd(x, grad, iters, order, eps)


@_sinkhorn_bwd_op.register_fake
def _(x, grad, iters, order, eps):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, iters, order, eps = inputs
    ctx.save_for_backward(x)
    ctx.config = (iters, order, eps)


def _backward_with(bwd):
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return bwd(x, grad, *ctx.config), None, None, None

    return backward


_sinkhorn = differentiable(_sinkhorn_fwd_op, _sinkhorn_bwd_op, sinkhorn_fwd, sinkhorn_bwd,
                          _setup_context, _backward_with)  # fmt: skip


def sinkhorn_knopp_triton(
    logits: torch.Tensor, iters: int = 20, order: str = "col_row", eps: float = 1e-12
) -> torch.Tensor:
    """Triton Sinkhorn-Knopp; arguments as :func:`mhc_kernels.sinkhorn_knopp` (validated there)."""
    n = logits.shape[-1]
    out = _sinkhorn(logits.reshape(-1, n, n), iters, order, eps)
    return out.reshape(logits.shape)
