"""Fused Triton Sinkhorn-Knopp: one forward kernel and one exact backward kernel, in two forms.

The maths is in ``reference.py``; these kernels run the same recurrence, operation for operation.

Limits. Matrices up to 16x16 are the design point (any n works; tiles are padded to the next power
of two, so register use grows as n^2). Input float32, float16 or bfloat16, iterations in float32.
Each program is persistent: it walks over blocks of ``BLOCK`` matrices, so every matrix is read
once and written once.

Two forms of the same kernels:

* **By matrix** (n = 1, 2, 4 or 8; a strided batch is made contiguous first): one thread holds
  whole matrices, as a tuple of n^2 ``[BLOCK]`` tensors (entry (i, j) of every matrix of the
  tile), split from a ``[BLOCK, n^2]`` tile loaded whole rows at a time and joined back into one
  for the store. A sum over a row or a column is n - 1 additions in the thread, and each of a
  matrix's 2n normalisers per iteration is one reciprocal. sm_90, n = 4, float32, per matrix and
  iteration: 132 instructions forward, where the tile form compiles (Triton 3.9) to 452: Triton
  spreads a ``[BLOCK, 4, 4]`` tile's matrix over 16 threads, so each sum takes shuffles and every
  thread computes the reciprocal of its own entry's line, 4 times the reciprocals needed. Triton
  3.6 compiles the tile form to one matrix per thread (132 instructions) but loads and stores
  each entry alone, 64 bytes apart across a warp; this form moves 16 bytes per thread of whole
  rows.
* **Tiles** (n = 3, 5-7, 9-16): ``[BLOCK, NP, NP]`` tiles, sums by ``tl.sum``; the coefficient
  epilogue (``mhc_kernels.coefficients.triton``) runs its Sinkhorn on these tiles too.

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


# ------------------------------------------------------- by matrix: whole matrices in a thread
# A tile's matrices as a tuple of NP * NP [BLOCK] tensors, entry e = i * NP + j of every matrix:
# every operation below is on whole [BLOCK] tensors, so a thread works on its own matrices alone.


@triton.jit
def _entries(tile, BLOCK: tl.constexpr, LV: tl.constexpr):
    """``[BLOCK, 2^LV]`` -> a tuple of its ``2^LV`` columns (``[BLOCK]`` each), in order: halved
    by ``tl.split`` LV times (lowest index bit first), which puts each column in the thread that
    holds its row."""
    cols = (tl.reshape(tile, [BLOCK]),) if LV == 0 else (tile,)
    for level in tl.static_range(LV):
        evens = ()
        odds = ()
        for i in tl.static_range(2**level):
            even, odd = tl.split(tl.reshape(cols[i], [BLOCK, 2 ** (LV - 1 - level), 2]))
            if level == LV - 1:
                even, odd = tl.reshape(even, [BLOCK]), tl.reshape(odd, [BLOCK])
            evens = evens + (even,)
            odds = odds + (odd,)
        cols = evens + odds  # column index bit ``level`` is the half's
    return cols


@triton.jit
def _tile(cols, BLOCK: tl.constexpr, LV: tl.constexpr):
    """The inverse of :func:`_entries`: ``2^LV`` columns -> ``[BLOCK, 2^LV]``."""
    for level in tl.static_range(LV):
        joined = ()
        for i in tl.static_range(2 ** (LV - 1 - level)):  # pairs apart by the highest bit left
            pair = tl.join(cols[i], cols[i + 2 ** (LV - 1 - level)])
            joined = joined + (tl.reshape(pair, [BLOCK, 2 ** (level + 1)]),)
        cols = joined
    return tl.reshape(cols[0], [BLOCK, 1]) if LV == 0 else cols[0]


@triton.jit
def _line(a, g: tl.constexpr, k: tl.constexpr, AXIS: tl.constexpr, NP: tl.constexpr):
    """Entry ``k`` of line ``g`` along tile axis ``AXIS``: 1 sums over rows (line g a column), 2
    over columns (line g a row)."""
    return a[k * NP + g if AXIS == 1 else g * NP + k]


@triton.jit
def _line_sums(a, NP: tl.constexpr, AXIS: tl.constexpr, MAX: tl.constexpr = False):
    """Each line's sum along ``AXIS`` (``MAX``: its maximum)."""
    sums = ()
    for g in tl.static_range(NP):
        s = _line(a, g, 0, AXIS, NP)
        for k in tl.static_range(1, NP):
            s = tl.maximum(s, _line(a, g, k, AXIS, NP)) if MAX else s + _line(a, g, k, AXIS, NP)
        sums = sums + (s,)
    return sums


@triton.jit
def _scale_lines(a, f, NP: tl.constexpr, AXIS: tl.constexpr):
    """Each entry times its line's factor ``f[g]``."""
    out = ()
    for e in tl.static_range(NP * NP):
        out = out + (a[e] * f[e % NP if AXIS == 1 else e // NP],)
    return out


@triton.jit
def _kernel_matrix_entries(x, NP: tl.constexpr, FIRST: tl.constexpr):
    """:func:`_kernel_matrix` by matrix."""
    maxima = _line_sums(x, NP, FIRST, True)
    shifts = ()
    for g in tl.static_range(NP):
        shifts = shifts + (tl.where(maxima[g] == float("-inf"), 0.0, maxima[g]),)
    out = ()
    for e in tl.static_range(NP * NP):
        out = out + (tl.exp(x[e] - shifts[e % NP if FIRST == 1 else e // NP]),)
    return out


@triton.jit
def _normalise_entries(a, NP: tl.constexpr, AXIS: tl.constexpr, eps):
    """:func:`_normalise` by matrix: ``(a / line sums, line sums)``."""
    line_sums = _line_sums(a, NP, AXIS)
    sums = ()
    inv = ()
    for g in tl.static_range(NP):
        s = line_sums[g] + eps
        sums = sums + (s,)
        inv = inv + (1.0 / s,)
    return _scale_lines(a, inv, NP, AXIS), sums


@triton.jit
def _slot_line(slot, step, g, NP: tl.constexpr, BLOCK: tl.constexpr):
    """The scratch addresses of line ``g`` of normaliser ``step``: ``[2 * iters, NP, BLOCK]``."""
    return slot + (step * NP + g) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _sub_lines(h, b, sums, NP: tl.constexpr, AXIS: tl.constexpr):
    """``h - b * sums`` with each entry's line sum."""
    out = ()
    for e in tl.static_range(NP * NP):
        out = out + (h[e] - b[e] * sums[e % NP if AXIS == 1 else e // NP],)
    return out


@triton.jit
def _store_lines(slot, step, lines, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Normaliser ``step``'s NP lines (``[BLOCK]`` each) into the scratch slot."""
    for g in tl.static_range(NP):
        tl.store(_slot_line(slot, step, g, NP, BLOCK), lines[g])


@triton.jit
def _load_lines(slot, step, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Normaliser ``step``'s NP lines from the scratch slot."""
    lines = ()
    for g in tl.static_range(NP):
        lines = lines + (tl.load(_slot_line(slot, step, g, NP, BLOCK)),)
    return lines


@triton.jit
def _load_entries(ptr, mats, num_mats, other, BLOCK: tl.constexpr, NP: tl.constexpr,
                  LV: tl.constexpr):  # fmt: skip
    """Matrices ``mats`` (``[BLOCK, 1]``) of a dense batch as float32 entries, and the
    ``(offsets, mask)`` of their ``[BLOCK, NP * NP]`` tile: whole rows of NP^2 elements."""
    entry = tl.arange(0, NP * NP)[None, :]
    offs = mats * (NP * NP) + entry
    mask = (mats < num_mats) & (entry < NP * NP)  # [BLOCK, NP * NP]
    tile = tl.load(ptr + offs, mask=mask, other=other).to(tl.float32)
    return _entries(tile, BLOCK, LV), offs, mask


@triton.jit
def _sinkhorn_fwd_by_matrix_kernel(x_ptr, p_ptr, num_mats, iters, eps, FIRST: tl.constexpr,
                                   SECOND: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
                                   LV: tl.constexpr):  # fmt: skip
    # a dense batch (contiguous, n = NP); LV = log2(NP * NP)
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_mats, BLOCK)
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        mats = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]
        x, offs, mask = _load_entries(x_ptr, mats, num_mats, float("-inf"), BLOCK, NP, LV)
        a = _kernel_matrix_entries(x, NP, FIRST)
        for _ in range(iters):
            a, _s = _normalise_entries(a, NP, FIRST, eps)
            a, _s = _normalise_entries(a, NP, SECOND, eps)
        tl.store(p_ptr + offs, _tile(a, BLOCK, LV).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sinkhorn_bwd_by_matrix_kernel(x_ptr, g_ptr, dx_ptr, scratch_ptr, num_mats, iters, eps,
                                   FIRST: tl.constexpr, SECOND: tl.constexpr, BLOCK: tl.constexpr,
                                   NP: tl.constexpr, LV: tl.constexpr):  # fmt: skip
    # as _sinkhorn_bwd_kernel, for dense x and g. Each thread reads back the normalisers it wrote
    # as long as Triton gives the scratch's stores and loads one layout (it does: one value per
    # thread); the barriers keep the scratch right if it did not
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_mats, BLOCK)
    slot = scratch_ptr + pid.to(tl.int64) * (2 * iters * NP * BLOCK)
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        mats = (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]
        x, offs, mask = _load_entries(x_ptr, mats, num_mats, float("-inf"), BLOCK, NP, LV)
        b = _kernel_matrix_entries(x, NP, FIRST)
        tl.debug_barrier()  # the previous tile's reads of the slot are done
        for it in range(iters):  # the forward, keeping the normalisers
            b, s = _normalise_entries(b, NP, FIRST, eps)
            _store_lines(slot, 2 * it, s, NP, BLOCK)
            b, s = _normalise_entries(b, NP, SECOND, eps)
            _store_lines(slot, 2 * it + 1, s, NP, BLOCK)
        grad = _load_entries(g_ptr, mats, num_mats, 0.0, BLOCK, NP, LV)[0]
        tl.debug_barrier()  # the normalisers are visible to every thread of the program
        h = ()
        for e in tl.static_range(NP * NP):
            h = h + (grad[e] * b[e],)  # h = dL/dA * A
        for it in range(iters):  # the division-free adjoint, walking back
            step = 2 * (iters - 1 - it)
            h = _sub_lines(h, b, _line_sums(h, NP, SECOND), NP, SECOND)
            b = _scale_lines(b, _load_lines(slot, step + 1, NP, BLOCK), NP, SECOND)
            h = _sub_lines(h, b, _line_sums(h, NP, FIRST), NP, FIRST)
            b = _scale_lines(b, _load_lines(slot, step, NP, BLOCK), NP, FIRST)
        tl.store(dx_ptr + offs, _tile(h, BLOCK, LV).to(dx_ptr.dtype.element_ty), mask=mask)


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


BY_MATRIX_TILE = 128  # matrices per program step on a GPU, by matrix: one per thread at 4 warps
BY_MATRIX_MAX_N = 8  # the largest n by matrix (16 would hold 256 entries per thread); 0: none


def by_matrix(n: int) -> bool:
    """Whether n x n matrices run by matrix (module docstring): n a power of two up to 8. Their
    batch is made contiguous first (a copy if it is not: one more pass over it); other n run in
    tiles."""
    return n <= BY_MATRIX_MAX_N and n & (n - 1) == 0


def _by_matrix_launch(num_mats: int, n: int, device: torch.device) -> tuple[dict, int]:
    """Constexprs and launch options by matrix, and the programs."""
    tile = None if interpreting() else BY_MATRIX_TILE * n * n
    block, _, programs = launch_config(num_mats, n, device, tile)
    warps = max(1, min(NUM_WARPS, block // 32))  # no thread without a matrix of its own
    return {"BLOCK": block, "NP": n, "LV": 2 * (n.bit_length() - 1), "num_warps": warps}, programs


def sinkhorn_fwd(x: torch.Tensor, iters: int, order: str, eps: float) -> torch.Tensor:
    """x: (B, n, n) any strides -> P: (B, n, n) contiguous, dtype of x."""
    num_mats, n = x.shape[0], x.shape[-1]
    out = torch.empty((num_mats, n, n), dtype=x.dtype, device=x.device)
    if num_mats == 0:
        return out
    first, second = order_axes(order)
    if by_matrix(n):
        consts, programs = _by_matrix_launch(num_mats, n, x.device)
        _sinkhorn_fwd_by_matrix_kernel[(programs,)](
            x.contiguous(), out, num_mats, iters, eps, FIRST=first, SECOND=second, **consts
        )
        return out
    block, np2, programs = launch_config(num_mats, n, x.device)
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
    first, second = order_axes(order)
    if by_matrix(n):
        consts, programs = _by_matrix_launch(num_mats, n, x.device)
        scratch = torch.empty(programs * 2 * iters * consts["BLOCK"] * n, dtype=torch.float32,
                              device=x.device)  # fmt: skip
        _sinkhorn_bwd_by_matrix_kernel[(programs,)](
            x.contiguous(), grad.contiguous(), dx, scratch, num_mats, iters, eps,
            FIRST=first, SECOND=second, **consts,
        )  # fmt: skip
        return dx
    block, np2, programs = launch_config(num_mats, n, x.device)
    scratch = torch.empty(programs * 2 * iters * block * np2, dtype=torch.float32, device=x.device)
    _sinkhorn_bwd_kernel[(programs,)](
        x, grad, dx, scratch, num_mats, n, *x.stride(), *grad.stride(), iters, eps,
        FIRST=first, SECOND=second, BLOCK=block, NP=np2, num_warps=num_warps(np2),
    )  # fmt: skip
    return dx


def shipped_configs(dtypes=("fp32", "bf16", "fp16"), orders=tuple(ORDER_DIMS)):
    """Every GPU kernel configuration the launchers can pick, for ahead-of-time compile checks.

    Yields ``(name, kernel, signature, constexprs, launch options)``: by matrix for n = 1, 2, 4, 8,
    in tiles for the other n (padded to 4, 8 or 16).
    """
    ints = dict.fromkeys(["num_mats", "n"], "i32")
    x_strides = dict.fromkeys(["stride_xb", "stride_xr", "stride_xc"], "i32")
    g_strides = dict.fromkeys(["stride_gb", "stride_gr", "stride_gc"], "i32")
    for np2, matrix in ((1, True), (2, True), (4, True), (8, True), (4, False), (8, False),
                        (16, False)):  # fmt: skip
        for dtype in dtypes:
            for order in orders:
                first, second = order_axes(order)
                if matrix:
                    block = BY_MATRIX_TILE
                    cs = {"FIRST": first, "SECOND": second, "BLOCK": block, "NP": np2,
                          "LV": 2 * (np2.bit_length() - 1)}  # fmt: skip
                    tail = {"num_mats": "i32", "iters": "i32", "eps": "fp32",
                            **dict.fromkeys(cs, "constexpr")}  # fmt: skip
                    fwd = {"x_ptr": f"*{dtype}", "p_ptr": f"*{dtype}", **tail}
                    bwd = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}",
                           "scratch_ptr": "*fp32", **tail}  # fmt: skip
                    kernels = (_sinkhorn_fwd_by_matrix_kernel, _sinkhorn_bwd_by_matrix_kernel)
                    launch, form = {"num_warps": NUM_WARPS}, "by_matrix"
                else:
                    block = max(1, _gpu_tile(np2) // (np2 * np2))
                    cs = {"FIRST": first, "SECOND": second, "BLOCK": block, "NP": np2}
                    tail = {"iters": "i32", "eps": "fp32", **dict.fromkeys(cs, "constexpr")}
                    fwd = {"x_ptr": f"*{dtype}", "p_ptr": f"*{dtype}", **ints, **x_strides, **tail}
                    bwd = {"x_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}",
                           "scratch_ptr": "*fp32", **ints, **x_strides, **g_strides,
                           **tail}  # fmt: skip
                    kernels = (_sinkhorn_fwd_kernel, _sinkhorn_bwd_kernel)
                    launch, form = {"num_warps": num_warps(np2)}, "tiles"
                tag = f"NP{np2}-B{block}-{dtype}-{order}-{form}"
                yield f"fwd-{tag}", kernels[0], fwd, cs, launch
                yield f"bwd-{tag}", kernels[1], bwd, cs, launch


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
