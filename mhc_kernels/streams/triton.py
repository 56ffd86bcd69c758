"""Fused Triton stream mixing: pre-mix and post/residual merge, forward and backward, and the
fused connection backward's stream gradient.

Limits: n up to 8 (padded to a power of two, padded streams masked), any C (blocks of up to 2048
or 512 channels, per kernel, with masks; a multiple of 8 gets 16-byte loads); streams float32,
float16 or bfloat16, coefficients float32. The grid is (token blocks, C blocks): a program owns BT
tokens x BC channels of every stream, loads those tokens' coefficients, and unrolls the streams so
that sums over streams stay in each thread's registers (BC runs across threads).

Traffic per token (the fused layer's point, paper §4.3): pre-mix reads n*C, writes C; merge reads
(n + 1)*C, writes n*C. Backward: pre-mix reads (n + 1)*C and writes n*C plus n coefficient
gradients; merge reads (2n + 1)*C and writes (n + 1)*C plus n^2 + n coefficient gradients. The
fused connection backward runs both without their stream gradient (pre-mix: reads (n + 1)*C;
merge: reads (2n + 1)*C, writes C) and writes that gradient once (``_stream_grad_kernel``: reads
(2n + 1)*C, writes n*C, phi^T read once per 4 tokens). Each program writes its C block's share of
the coefficient gradients; the launcher adds the C blocks' shares (none to add for whole rows; no
atomics, deterministic). Measured on an H200: benchmarks/README.md. The merge backward's form
(``MERGE_LOADS_FIRST``) and the stream gradient's updates per loop step (``STREAM_GRAD_UNROLL``)
are the H200 sweep's choices (benchmarks/sweep_streams.py times each against the others). The
merge backward of 16-bit streams has a third form on tensor cores (``_merge_bwd_mma_kernel``:
its sums over streams and channels as products), not shipped until timed (``MERGE_MMA``).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .._autograd import backward_from_saved, differentiable, save_inputs
from .._host import add_parts, cdiv, next_power_of_2, rows, shaped
from .._split_dot import MIN_DOT, mma, parts16, parts_fp32
from ..sinkhorn.triton import interpreting

# --------------------------------------------------------------------------------------- kernels
# Grid: (token blocks, C blocks). A program owns BT tokens x BC channels of every stream. Tiles are
# [BT, NP, BC] or [BT, BC] with BC across threads (16 contiguous bytes per thread), so sums over
# streams stay in a thread's registers; streams are unrolled (static_range) and masked past n.


@triton.jit
def _multiple(C, CV: tl.constexpr):
    """``C`` itself, which the launcher promises is a multiple of ``CV``, written so that Triton
    knows it: with CV = 8 the rows load 16 bytes per thread for any C that is a multiple of 8
    (Triton's own specialisation covers multiples of 16 only; a ``tl.multiple_of`` hint on the
    scalar does not reach the loads' masks)."""
    return C // CV * CV


@triton.jit
def _token_channel_tile(T, C, BT: tl.constexpr, BC: tl.constexpr):
    """This program's tokens (``tok``, int64 ``t64``), channels ``c2: [1, BC]``, mask ``[BT, BC]``."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    c2 = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    return tok, tok.to(tl.int64), c2, (tok[:, None] < T) & (c2 < C)


@triton.jit
def _stream_tile(tok, t64, c2, T, n, C, NP: tl.constexpr):
    """Stream indices ``i2: [1, NP]`` and their ``[BT, NP]`` mask; the ``[BT, NP, BC]`` offsets'
    factors ``t3, i3, c3`` and mask."""
    i2 = tl.arange(0, NP)[None, :]
    i3 = tl.arange(0, NP)[None, :, None]
    t3 = t64[:, None, None]
    c3 = c2[:, None, :]
    mi = (tok[:, None] < T) & (i2 < n)
    m3 = (t3 < T) & (i3 < n) & (c3 < C)
    return i2, mi, t3, i3, c3, m3


@triton.jit
def _pre_mix_fwd_kernel(x_ptr, h_ptr, out_ptr, T, n, C,
                        BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
                        CV: tl.constexpr):  # fmt: skip
    C = _multiple(C, CV)
    tok, t64, c2, m2 = _token_channel_tile(T, C, BT, BC)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(NP):
        Tj = T * (n > j)  # no tokens in a padded stream (a tensor mask even when n is constexpr)
        hj = tl.load(h_ptr + t64 * n + j, mask=tok < Tj, other=0.0)  # [BT]
        xj = tl.load(x_ptr + t64[:, None] * n * C + j * C + c2,
                     mask=(tok[:, None] < Tj) & (c2 < C), other=0.0)  # fmt: skip
        acc += hj[:, None] * xj.to(tl.float32)
    tl.store(out_ptr + t64[:, None] * C + c2, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _pre_mix_bwd_kernel(x_ptr, h_ptr, g_ptr, dx_ptr, dh_part_ptr, T, n, C,
                        BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
                        CV: tl.constexpr, WRITE_DX: tl.constexpr):  # fmt: skip
    # dx[t, j, c] = h[t, j] g[t, c] (unless WRITE_DX is off: the connection's stream gradient
    # kernel writes it);  dh[t, j] = sum_c g[t, c] x[t, j, c] (this program's C part)
    C = _multiple(C, CV)
    tok, t64, c2, m2 = _token_channel_tile(T, C, BT, BC)
    part = dh_part_ptr + tl.program_id(1).to(tl.int64) * T * n
    g = tl.load(g_ptr + t64[:, None] * C + c2, mask=m2, other=0.0).to(tl.float32)  # [BT, BC]
    for j in tl.static_range(NP):
        Tj = T * (n > j)
        m2j = (tok[:, None] < Tj) & (c2 < C)
        offs = t64[:, None] * n * C + j * C + c2
        xj = tl.load(x_ptr + offs, mask=m2j, other=0.0).to(tl.float32)
        if WRITE_DX:
            hj = tl.load(h_ptr + t64 * n + j, mask=tok < Tj, other=0.0)
            tl.store(dx_ptr + offs, (hj[:, None] * g).to(dx_ptr.dtype.element_ty), mask=m2j)
        tl.store(part + t64 * n + j, tl.sum(g * xj, axis=1), mask=tok < Tj)


@triton.jit
def _merge_fwd_kernel(x_ptr, y_ptr, hpost_ptr, hres_ptr, out_ptr, T, n, C,
                      BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
                      CV: tl.constexpr):  # fmt: skip
    # out[t, i, c] = sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] y[t, c]
    C = _multiple(C, CV)
    tok, t64, c2, m2 = _token_channel_tile(T, C, BT, BC)
    i2, mi, t3, i3, c3, m3 = _stream_tile(tok, t64, c2, T, n, C, NP)
    hpost = tl.load(hpost_ptr + t64[:, None] * n + i2, mask=mi, other=0.0)
    y = tl.load(y_ptr + t64[:, None] * C + c2, mask=m2, other=0.0).to(tl.float32)
    acc = hpost[:, :, None] * y[:, None, :]  # [BT, NP, BC]
    for j in tl.static_range(NP):
        Tj = T * (n > j)
        hcol = tl.load(hres_ptr + t64[:, None] * n * n + i2 * n + j,
                       mask=(tok[:, None] < Tj) & (i2 < n), other=0.0)  # fmt: skip
        xj = tl.load(x_ptr + t64[:, None] * n * C + j * C + c2,
                     mask=(tok[:, None] < Tj) & (c2 < C), other=0.0)  # fmt: skip
        acc += hcol[:, :, None] * xj.to(tl.float32)[:, None, :]
    tl.store(out_ptr + t3 * n * C + i3 * C + c3, acc.to(out_ptr.dtype.element_ty), mask=m3)


@triton.jit
def _merge_bwd_kernel(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr, dhpost_part_ptr,
                      dhres_part_ptr, T, n, C,
                      BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
                      CV: tl.constexpr, WRITE_DX: tl.constexpr,
                      LOADS_FIRST: tl.constexpr):  # fmt: skip
    # dx[t, j] = sum_i h_res[t, i, j] g[t, i] (unless WRITE_DX is off);  dy[t] = sum_i h_post g
    # dh_res[t, i, j] = sum_c g[t, i, c] x[t, j, c];  dh_post[t, i] = sum_c g[t, i, c] y[t, c]
    # in one of two forms: stream by stream, or every load before the first store (LOADS_FIRST)
    C = _multiple(C, CV)
    tok, t64, c2, m2 = _token_channel_tile(T, C, BT, BC)
    i2, mi, t3, i3, c3, m3 = _stream_tile(tok, t64, c2, T, n, C, NP)
    cpart = tl.program_id(1).to(tl.int64) * T
    if LOADS_FIRST:
        _merge_bwd_loads_first(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr,
                               dhpost_part_ptr, dhres_part_ptr, t64, c2, m2, t3, i3, c3, m3, cpart,
                               T, n, C, NP, WRITE_DX)  # fmt: skip
    else:
        _merge_bwd_by_stream(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr,
                             dhpost_part_ptr, dhres_part_ptr, tok, t64, c2, m2, i2, mi, t3, i3, c3,
                             m3, cpart, T, n, C, NP, WRITE_DX)  # fmt: skip


@triton.jit
def _merge_bwd_by_stream(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr, dhpost_part_ptr,
                         dhres_part_ptr, tok, t64, c2, m2, i2, mi, t3, i3, c3, m3, cpart, T, n, C,
                         NP: tl.constexpr, WRITE_DX: tl.constexpr):  # fmt: skip
    """The merge backward stream by stream: g whole, then per stream j the h_res column, dx[t, j]
    stored, x[t, j] loaded and summed against g. The form of n > LOADS_FIRST_STREAMS (n = 8),
    whose loads-first form would take 195-247 registers."""
    g = tl.load(g_ptr + t3 * n * C + i3 * C + c3, mask=m3, other=0.0).to(tl.float32)  # [BT,NP,BC]
    hpost = tl.load(hpost_ptr + t64[:, None] * n + i2, mask=mi, other=0.0)
    y = tl.load(y_ptr + t64[:, None] * C + c2, mask=m2, other=0.0).to(tl.float32)
    dy = tl.sum(hpost[:, :, None] * g, axis=1)
    tl.store(dy_ptr + t64[:, None] * C + c2, dy.to(dy_ptr.dtype.element_ty), mask=m2)
    tl.store(dhpost_part_ptr + (cpart + t64[:, None]) * n + i2, tl.sum(g * y[:, None, :], axis=2),
             mask=mi)  # fmt: skip
    for j in tl.static_range(NP):
        Tj = T * (n > j)
        mij = (tok[:, None] < Tj) & (i2 < n)
        m2j = (tok[:, None] < Tj) & (c2 < C)
        offs = t64[:, None] * n * C + j * C + c2
        if WRITE_DX:
            hcol = tl.load(hres_ptr + t64[:, None] * n * n + i2 * n + j, mask=mij, other=0.0)
            dxj = tl.sum(hcol[:, :, None] * g, axis=1)  # [BT, BC]
            tl.store(dx_ptr + offs, dxj.to(dx_ptr.dtype.element_ty), mask=m2j)
        xj = tl.load(x_ptr + offs, mask=m2j, other=0.0).to(tl.float32)
        dcol = tl.sum(g * xj[:, None, :], axis=2)  # [BT, NP]: dh_res[t, :, j]
        tl.store(dhres_part_ptr + (cpart + t64[:, None]) * n * n + i2 * n + j, dcol, mask=mij)


@triton.jit
def _merge_bwd_loads_first(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr,
                           dhpost_part_ptr, dhres_part_ptr, t64, c2, m2, t3, i3, c3, m3, cpart,
                           T, n, C, NP: tl.constexpr, WRITE_DX: tl.constexpr):  # fmt: skip
    """The merge backward with every global load issued before its first store. Stream by
    stream (``_merge_bwd_by_stream``), each x[t, j] load follows the store of dx[t, j - 1]: the
    compiler cannot tell that they do not alias, so it keeps their order, and each program waits
    out a memory latency per stream and per h_res column (SASS of the n = 4 bf16 kernel, sm_90:
    STG, LDG, then the sum that needs it, four times). Here g and x are [BT, NP, BC] tiles loaded
    together, stream j of x is picked in registers (NP is in-thread: the selects fold away) and
    the per-stream values keep the tile's layout ([BT, NP, 1]), at the cost of holding x whole.
    The rows y and dy stay [BT, BC] as in the other form: laid out as [BT, 1, BC] tiles, a y of
    another dtype than the streams' took 27 barriers and spilled on sm_80 (23 and none so)."""
    offs = t3 * n * C + i3 * C + c3
    stream_mask = (t3 < T) & (i3 < n)  # [BT, NP, 1]
    g = tl.load(g_ptr + offs, mask=m3, other=0.0).to(tl.float32)  # [BT, NP(i), BC]
    x = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)  # [BT, NP(j), BC]
    y = tl.load(y_ptr + t64[:, None] * C + c2, mask=m2, other=0.0).to(tl.float32)[:, None, :]
    hpost = tl.load(hpost_ptr + t3 * n + i3, mask=stream_mask, other=0.0)  # [BT, NP, 1]
    if WRITE_DX:
        dx = tl.zeros_like(g)
        for j in tl.static_range(NP):
            mask_j = (t3 < T * (n > j)) & (i3 < n)  # no tokens in a padded stream
            hcol = tl.load(hres_ptr + t3 * n * n + i3 * n + j, mask=mask_j, other=0.0)  # [BT,NP,1]
            dx = tl.where(i3 == j, tl.sum(hcol * g, axis=1, keep_dims=True), dx)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m3)
    dy = tl.sum(hpost * g, axis=1)  # [BT, BC]
    tl.store(dy_ptr + t64[:, None] * C + c2, dy.to(dy_ptr.dtype.element_ty), mask=m2)
    tl.store(dhpost_part_ptr + (cpart + t3) * n + i3, tl.sum(g * y, axis=2, keep_dims=True),
             mask=stream_mask)  # fmt: skip
    for j in tl.static_range(NP):
        xj = tl.sum(tl.where(i3 == j, x, 0.0), axis=1, keep_dims=True)  # [BT, 1, BC]: stream j
        tl.store(dhres_part_ptr + (cpart + t3) * n * n + i3 * n + j,
                 tl.sum(g * xj, axis=2, keep_dims=True),
                 mask=(t3 < T * (n > j)) & (i3 < n))  # fmt: skip


@triton.jit
def _by_parts(a_hi, a_mid, a_lo, b, acc, PARTS_FP32: tl.constexpr):
    """``acc + a @ b`` for ``a`` in three 16-bit parts and 16-bit ``b``: exact products, the
    small terms first."""
    return mma(a_hi, b, mma(a_mid, b, mma(a_lo, b, acc, PARTS_FP32), PARTS_FP32), PARTS_FP32)


@triton.jit
def _merge_bwd_mma_kernel(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr,
                          dhpost_part_ptr, dhres_part_ptr, T, n, C,
                          BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr,
                          BK: tl.constexpr, CV: tl.constexpr, WRITE_DX: tl.constexpr,
                          STAGES: tl.constexpr, PARTS_FP32: tl.constexpr):  # fmt: skip
    """The merge backward of 16-bit streams on tensor cores. The program's BT tokens are the
    R = BT NP rows (token t, stream i) of a (T n, C) matrix, and it walks its C block in steps of
    BK channels (loads pipelined over STAGES), every sum over streams or channels a product:

        dh_res[t] = (g x^T)[t's block]      dh_post[t] = (g y^T)[t's rows, t]   (sums over C)
        dx = A g, A[(t, i), (t, j)] = h_res[t, j, i]    dy = P g, P[t, (t, i)] = h_post[t, i]

    g, x and y are 16-bit, so their products are exact in the products' float32 sums; A and P,
    float32, go in as three parts in the streams' dtype (``parts16``: float32's 24 significant
    bits, so dx and dy sum what float32 FMAs would; two parts left 2e-5 where n = 8 terms
    cancel). A and P are block diagonal (one token's block), so the products of dx
    and dy do BT times the work they need, on units the other form leaves idle: against
    ``_merge_bwd_loads_first``'s 3.3-4.2 warp instructions per token and channel (n = 4 bf16,
    sm_90, Triton 3.6), 0.9-1.6 here. Without dx, none of its loads or products."""
    C = _multiple(C, CV)
    R: tl.constexpr = BT * NP
    BY: tl.constexpr = BT if BT >= 16 else 16  # y's and dy's rows: a product's least
    dt = g_ptr.dtype.element_ty
    t0 = tl.program_id(0) * BT
    c0 = tl.program_id(1) * BC
    r = tl.arange(0, R)  # rows (t0 + r // NP, r % NP), as rows or as columns
    rt = t0 + r // NP
    ri = r % NP
    row_ok = (rt < T) & (ri < n)
    same = (r // NP)[:, None] == (r // NP)[None, :]  # [R, R]: one token's block
    yr = tl.arange(0, BY)  # y's rows: tokens t0 + yr, those past BT masked
    y_ok = (yr < BT) & (t0 + yr < T)
    y_off = (t0 + yr).to(tl.int64) * C
    row_off = rt.to(tl.int64) * n * C + ri * C
    if WRITE_DX:
        a = tl.load(hres_ptr + rt.to(tl.int64)[:, None] * n * n + ri[None, :] * n + ri[:, None],
                    mask=same & row_ok[:, None] & row_ok[None, :], other=0.0)  # fmt: skip
        a_hi, a_mid, a_lo = parts16(a, dt)
    p = tl.load(hpost_ptr + rt.to(tl.int64)[None, :] * n + ri[None, :],
                mask=(yr[:, None] == (r // NP)[None, :]) & y_ok[:, None] & row_ok[None, :],
                other=0.0)  # [BY, R]  # fmt: skip
    p_hi, p_mid, p_lo = parts16(p, dt)
    dres = tl.zeros((R, R), dtype=tl.float32)
    dpost = tl.zeros((R, BY), dtype=tl.float32)
    k = tl.arange(0, BK)
    for kc in tl.range(c0, tl.minimum(c0 + BC, C), BK, num_stages=STAGES):
        c_ok = kc + k < C
        m = row_ok[:, None] & c_ok[None, :]
        offs = row_off[:, None] + (kc + k)[None, :]
        g = tl.load(g_ptr + offs, mask=m, other=0.0)  # [R, BK]
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        my = y_ok[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + y_off[:, None] + (kc + k)[None, :], mask=my, other=0.0)  # [BY, BK]
        dres = mma(g, tl.trans(x), dres, PARTS_FP32)
        dpost = mma(g, tl.trans(y), dpost, PARTS_FP32)
        dy = _by_parts(p_hi, p_mid, p_lo, g, tl.zeros((BY, BK), dtype=tl.float32), PARTS_FP32)
        tl.store(dy_ptr + y_off[:, None] + (kc + k)[None, :], dy.to(dy_ptr.dtype.element_ty),
                 mask=my)  # fmt: skip
        if WRITE_DX:
            dx = _by_parts(a_hi, a_mid, a_lo, g, tl.zeros((R, BK), dtype=tl.float32), PARTS_FP32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    part = tl.program_id(1).to(tl.int64) * T + rt.to(tl.int64)  # this C block's share
    tl.store(dhres_part_ptr + part[:, None] * n * n + ri[:, None] * n + ri[None, :], dres,
             mask=same & row_ok[:, None] & row_ok[None, :])  # fmt: skip
    tl.store(dhpost_part_ptr + part[:, None] * n + ri[:, None] + 0 * yr[None, :], dpost,
             mask=((r // NP)[:, None] == yr[None, :]) & row_ok[:, None] & y_ok[None, :])  # fmt: skip


@triton.jit
def _stream_grad_kernel(x_ptr, gin_ptr, gout_ptr, hpre_ptr, hres_ptr, dss_ptr, dproj_ptr,
                        phit_ptr, dx_ptr, T, n, C, W: tl.constexpr,
                        HAS_GOUT: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
                        BC: tl.constexpr, CV: tl.constexpr, UNROLL: tl.constexpr,
                        STAGES: tl.constexpr):  # fmt: skip
    # the connection's whole stream gradient, dx[t, i, c] =
    #   h_pre[t, i] g_in[t, c]                    (pre-mix)
    # + sum_j h_res[t, j, i] g_out[t, j, c]       (merge; without it when HAS_GOUT is off)
    # + 2 dss[t] x[t, i, c] + sum_w dproj[t, w] phi[i C + c, w]     (projection; phi^T given)
    # as one [BT, NP, BC] tile with no sums over streams; every load is addressed in the tile's own
    # shape ([BT, 1, 1] per token, [BT, NP, 1] per stream, [BT, 1, BC] per row) so that values
    # need not change layout. The projection's term: W rank-1 updates, BT tokens sharing each row
    # of phi^T, UNROLL of them per loop step (their loads issued together: a step's FMAs wait on
    # its loads), the loop's loads copied STAGES - 1 steps ahead into shared memory when
    # STAGES >= 2 (cp.async; 1: plain loads, the same code as a plain range). W is a constexpr,
    # as in the projection's kernels: fewer instructions and registers per step. (A form with
    # that term as one [BT, W] x [W, n BC] product on bf16 tensor cores, split operands, was
    # 1.07-1.22x slower on the H200 at the same launches, with twice the registers; removed
    # after two sweeps.)
    C = _multiple(C, CV)
    tok, t64, c2, m2 = _token_channel_tile(T, C, BT, BC)
    i2, mi, t3, i3, c3, m3 = _stream_tile(tok, t64, c2, T, n, C, NP)
    offs = t3 * n * C + i3 * C + c3
    tm = t3 < T  # [BT, 1, 1]
    row_mask = tm & (c3 < C)  # [BT, 1, BC]
    hpre = tl.load(hpre_ptr + t3 * n + i3, mask=tm & (i3 < n), other=0.0)  # [BT, NP, 1]
    g_in = tl.load(gin_ptr + t3 * C + c3, mask=row_mask, other=0.0).to(tl.float32)
    dss = tl.load(dss_ptr + t3, mask=tm, other=0.0)
    x = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
    acc = hpre * g_in + (2.0 * dss) * x
    if HAS_GOUT:
        for j in tl.static_range(NP):
            tj = t3 < T * (n > j)  # no tokens in a padded stream
            hrow = tl.load(hres_ptr + t3 * n * n + j * n + i3, mask=tj & (i3 < n), other=0.0)
            gj = tl.load(gout_ptr + t3 * n * C + j * C + c3, mask=tj & (c3 < C), other=0.0)
            acc += hrow * gj.to(tl.float32)  # h_res[t, j, i] g_out[t, j, c]
    phi_row = i3 * C + c3  # [1, NP, BC]
    for w0 in tl.range(0, W, UNROLL, num_stages=STAGES):
        for u in tl.static_range(UNROLL):
            w = w0 + u
            Tw, nw = T * (W > w), n * (W > w)  # no tokens, no streams past the last row
            dp = tl.load(dproj_ptr + t3 * W + w, mask=t3 < Tw, other=0.0)  # [BT, 1, 1]
            ph = tl.load(phit_ptr + w * n * C + phi_row, mask=(i3 < nw) & (c3 < C), other=0.0)
            acc += dp * ph
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=m3)


# -------------------------------------------------------------------------------------- launchers

# channels per program and warps, at most, per kernel on a GPU, keyed by (kernel, stream item size:
# 4 float32, 2 bf16/fp16). The H200 sweeps (n = 4, C = 1488, 16,384 tokens, each kernel alone;
# benchmarks/README.md): the forwards and the pre-mix backward were fastest with a whole token row
# per program (2048 channels: 1.18-1.28x the roofline, against 1.22-1.37x in the 512-channel
# blocks they had), the pre-mix backward on at most 4 warps (bf16 1.23x; on 8, 1.42x); the merge
# backward, loads first (below), float32 with a whole row on 8 warps (0.324 ms, 1.14x; 0.346 ms
# stream by stream in 512 channels on 2 warps) and bf16 in 512 channels on 2 warps (0.203 ms,
# 1.43x; 0.210 ms stream by stream)
GPU_BLOCKS = {
    **{("pre_mix_fwd", size): (2048, 8) for size in (4, 2)},
    **{("merge_fwd", size): (2048, 8) for size in (4, 2)},
    **{("pre_mix_bwd", size): (2048, 4) for size in (4, 2)},
    ("merge_bwd", 4): (2048, 8),
    ("merge_bwd", 2): (512, 2),
}
# the merge backward's form: stream by stream (each program waiting out a load per stream) or, for
# n <= LOADS_FIRST_STREAMS, every load before its first store (``_merge_bwd_loads_first``), as
# shipped: faster on the H200 at each dtype's best launch (above). Holding x whole costs registers
# (sm_90, n = 4: bf16 64 -> 102, fp32 70 -> 121, no spills on sm_80/89/90); at n = 8, 195-247
# against 128-135, so n = 8 stays stream by stream
MERGE_LOADS_FIRST = True
LOADS_FIRST_STREAMS = 4
GPU_STREAM_ELEMS_PER_THREAD = 64  # [NP, BC] elements per thread at most (the sweep's limit)
GPU_TILE_ELEMS_PER_THREAD = 16  # [BT, NP, BC] tile elements per thread when BT > 1 (more spilled)
VECTOR_BYTES = 16  # one 128-bit load or store per thread per stream row
INTERPRETER_TILE_ELEMS = 2**18  # the interpreter's cost is per program: few, large programs
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_config(kernel: str, tokens: int, n: int, C: int, itemsize: int = 4) -> dict:
    """The launch options of ``kernel`` (named in ``GPU_BLOCKS``): tokens ``BT`` and channels ``BC``
    per program, padded ``NP``, ``CV`` (8 when C is a multiple of 8, else 1: see ``_multiple``) and
    ``num_warps``.

    On a GPU, C in blocks of up to the kernel's ``GPU_BLOCKS`` width, narrower where the streams'
    ``[NP, BC]`` tile would take more than ``GPU_STREAM_ELEMS_PER_THREAD`` registers per thread.
    A warp spans 32 x 16 bytes of one stream row, and the program has as many warps as its C block
    needs (4 for 512 fp32 channels, 2 for 512 bf16/fp16 ones), up to the kernel's cap. With more
    warps than that, Triton lays the spare warps across the streams, so each sum over streams goes
    through shared memory with barriers and the stream rows load 8 bytes per thread instead of 16
    (PTX of the n = 4 bf16 merge: 9 barriers in the forward and 79 in the backward at 4 warps; 0
    and 19 at 2 warps, as fp32 at 4; checked for every shipped configuration by the compile
    check's test).
    """
    np2 = next_power_of_2(n)
    block_c, max_warps = GPU_BLOCKS[kernel, itemsize]
    if interpreting():
        bc = min(next_power_of_2(C), INTERPRETER_TILE_ELEMS)
        warps, tile = 4, INTERPRETER_TILE_ELEMS
    else:
        # the register bound binds only where the warps are at their cap (n <= 8)
        bc = min(next_power_of_2(C), block_c, GPU_STREAM_ELEMS_PER_THREAD * 32 * max_warps // np2)
        warps = min(max_warps, max(1, bc * itemsize // (32 * VECTOR_BYTES)))
        tile = GPU_TILE_ELEMS_PER_THREAD * 32 * warps
    bt = min(next_power_of_2(max(tokens, 1)), max(1, tile // (np2 * bc)))
    return {"BT": bt, "NP": np2, "BC": bc, "CV": 8 if C % 8 == 0 else 1, "num_warps": warps}


def merge_loads_first(n: int) -> bool:
    """Whether the merge backward of ``n`` streams takes its loads-first form."""
    return MERGE_LOADS_FIRST and n <= LOADS_FIRST_STREAMS


# the merge backward of 16-bit streams (and a branch output of their dtype) on tensor cores
# (``_merge_bwd_mma_kernel``). Off until an H200 times it: the loads-first form was 1.43x the
# roofline at its best (bf16, n = 4), the one apply kernel outside the 1.3x, and its
# SASS issues 3.3-4.2 warp instructions per token and channel, this form 0.9-1.6
# (benchmarks/HISTORY.md, "Offline, 2026-11-27 (night)"). GPU launch: rows (tokens x padded
# streams) per program, channels per program (a C block; its coefficient gradients summed by the
# launcher as the other forms'), channels per loop step, warps and pipeline stages
MERGE_MMA = False
MMA_DTYPES = (torch.bfloat16, torch.float16)
GPU_MMA_MERGE = {"rows": 16, "BC": 512, "BK": 64, "num_warps": 4, "STAGES": 2}


def merge_mma(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the merge backward of streams ``x`` and branch output ``y`` takes its tensor-core
    form: shipped on (``MERGE_MMA``), 16-bit streams and ``y`` of their dtype."""
    return MERGE_MMA and x.dtype in MMA_DTYPES and y.dtype == x.dtype


def merge_mma_config(n: int, C: int, **gpu) -> dict:
    """Launch options of ``_merge_bwd_mma_kernel``: ``GPU_MMA_MERGE``'s (``gpu`` overrides them:
    the sweep's) with the tokens per program that make its rows; under the interpreter a whole
    row of C per program and step, as few programs as a product's 16 rows allow."""
    np2, row = next_power_of_2(n), next_power_of_2(C)
    if interpreting():
        launch = {"rows": MIN_DOT, "BC": row, "BK": row, "num_warps": 4, "STAGES": 1}
    else:
        launch = {**GPU_MMA_MERGE, **gpu}
    bt = max(1, launch.pop("rows") // np2, MIN_DOT // np2)
    bc = min(launch.pop("BC"), max(launch["BK"], row))
    return {**launch, "BT": bt, "NP": np2, "BC": bc, "CV": 8 if C % 8 == 0 else 1,
            "PARTS_FP32": parts_fp32()}  # fmt: skip


def _grid(T: int, C: int, config: dict) -> tuple[int, int]:
    return cdiv(T, config["BT"]), cdiv(C, config["BC"])


def _check(x: torch.Tensor, n: int):
    if n > 8:
        raise ValueError(f"the fused stream kernels take n <= 8 streams, got {n}")


def pre_mix_fwd(x, h):
    T, n, C = x.shape
    _check(x, n)
    out = torch.empty((T, C), dtype=x.dtype, device=x.device)
    config = launch_config("pre_mix_fwd", T, n, C, x.element_size())
    _pre_mix_fwd_kernel[_grid(T, C, config)](x, h, out, T, n, C, **config)
    return out


def pre_mix_bwd(x, h, g, want_dx: bool = True):
    """``(dx, dh)``; ``want_dx=False``: ``(None, dh)`` (reads x and g, writes no stream)."""
    T, n, C = x.shape
    config = launch_config("pre_mix_bwd", T, n, C, x.element_size())
    grid = _grid(T, C, config)
    dx = torch.empty_like(x) if want_dx else None
    dh = torch.empty((grid[1], T, n), dtype=torch.float32, device=x.device)  # per C block
    _pre_mix_bwd_kernel[grid](x, h, g, x if dx is None else dx, dh, T, n, C, WRITE_DX=want_dx,
                              **config)  # fmt: skip
    return dx, add_parts(dh)


def merge_fwd(x, y, h_post, h_res):
    T, n, C = x.shape
    _check(x, n)
    out = torch.empty_like(x)
    config = launch_config("merge_fwd", T, n, C, x.element_size())
    _merge_fwd_kernel[_grid(T, C, config)](x, y, h_post, h_res, out, T, n, C, **config)
    return out


def merge_bwd(x, y, h_post, h_res, g, want_dx: bool = True):
    """``(dx, dy, dh_post, dh_res)``; ``want_dx=False``: ``dx`` is ``None`` (not computed)."""
    T, n, C = x.shape
    if merge_mma(x, y):
        kernel, config = _merge_bwd_mma_kernel, merge_mma_config(n, C)
    else:
        config = launch_config("merge_bwd", T, n, C, x.element_size())
        kernel, config = _merge_bwd_kernel, {**config, "LOADS_FIRST": merge_loads_first(n)}
    grid = _grid(T, C, config)
    dx, dy = torch.empty_like(x) if want_dx else None, torch.empty_like(y)
    dh_post = torch.empty((grid[1], T, n), dtype=torch.float32, device=x.device)  # per C block
    dh_res = torch.empty((grid[1], T, n, n), dtype=torch.float32, device=x.device)
    kernel[grid](x, y, h_post, h_res, g, x if dx is None else dx, dy, dh_post, dh_res, T, n, C,
                 WRITE_DX=want_dx, **config)  # fmt: skip
    return dx, dy, add_parts(dh_post), add_parts(dh_res)


# tokens per program sharing each row of phi^T read (GPU), for either stream dtype. The H200
# sweeps (n = 4, C = 1488, 16,384 tokens): one update per loop step, float32 was fastest with 4
# tokens x 128 channels on 4 warps (0.47 ms, 1.8x the roofline; 16 x 32 was 0.70 ms) and 16-bit
# with 16 x 64 on 2 warps (0.42 ms); with several per step (``STREAM_GRAD_UNROLL``, below), 16-bit
# with 4 tokens as well (4 x 256 on 8 warps; 2026-11-27, sweep-grad): one warp per 32 channels
STREAM_GRAD_TOKENS = 4
# rank-1 updates per step of the FMA form's loop over W (``UNROLL``), for either stream dtype: 4.
# The H200's sweep-grad (2026-11-27; n = 4, C = 1488, 16,384 tokens): float32 0.451 ms
# at 4 x 128 on 4 warps, 1.71x the roofline (one update per step: 0.579 ms, 2.19x; 8 per step
# 0.446 ms at 8 x 128), bf16 0.355 ms at 4 x 256 on 8 warps, 2.69x (one per step at 16 x 64 on 2
# warps: 0.488 ms, 3.69x; 8 per step 0.353 ms); 4 rather than 8 for fewer registers at about the
# same time. Why: at STREAM_GRAD_STAGES = 1 the loop's loads are issued in the step that uses
# them, so each step waits out an L2 latency, and several updates per step overlap those waits
# (SASS, n = 4 bf16, sm_90: 16 loads of dproj and one of phi^T, then the 64 FMAs that need them,
# 24 times; float32's 4 tokens per program: Triton 3.9's LLVM unrolled 4 steps itself, 3.6's, the
# lent GPUs', did not). With W a constexpr (a loop of known length), n = 4 bf16 takes 140, 157, 197
# and 251 registers at 1, 2, 4 and 8 per step on sm_90 with Triton 3.6 (153, 168, 251 and a
# 192-byte spill with W an argument)
STREAM_GRAD_UNROLL = 4
# pipeline stages of that loop (``STAGES``): 1, its loads issued in the step that uses them, as
# timed. With 2-4, Triton copies them ahead into shared memory (sm_90, Triton 3.6, n = 4 bf16:
# 5 cp.async and 8 shared loads per update at 1 per step, 44 instructions against 36, 75-80
# registers against 63, no spills), so no step waits out an L2 latency; never timed
# (sweep_streams --kernels stream_grad retimes its fastest launches so)
STREAM_GRAD_STAGES = 1


def stream_grad_config(tokens: int, n: int, C: int, itemsize: int = 4) -> dict:
    """Launch options of the stream gradient kernel: ``launch_config``'s, except that a GPU program
    takes several tokens (``STREAM_GRAD_TOKENS``: 4) and a narrower C block to match, one warp per
    32 channels, so that the tokens share each read of phi^T (one token per program would cost 16x
    more L2 traffic in phi^T than DRAM traffic in streams); its updates per loop step
    (``STREAM_GRAD_UNROLL``) and the loop's stages (``STREAM_GRAD_STAGES``)."""
    config = {**launch_config("merge_bwd", tokens, n, C, itemsize),  # reads what the merge's reads
              "UNROLL": STREAM_GRAD_UNROLL, "STAGES": STREAM_GRAD_STAGES}  # fmt: skip
    if interpreting():
        return config
    np2 = config["NP"]
    tile = GPU_TILE_ELEMS_PER_THREAD * 32 * 4 * (4 // itemsize)
    bt = min(next_power_of_2(max(tokens, 1)), STREAM_GRAD_TOKENS)
    bc = min(next_power_of_2(C), max(16, tile // (bt * np2)))
    bt = min(next_power_of_2(max(tokens, 1)), max(1, tile // (np2 * bc)))
    # one warp per 32 channels, and at most 64 tile elements per thread (n = 8 16-bit: 128 spilled)
    warps = min(8, max(1, bc // 32, bt * np2 * bc // (32 * 64)))
    return {**config, "BT": bt, "BC": bc, "num_warps": warps}


def stream_grad(x, g_in, g_out, h_pre, h_res, dss, dproj, phi_t):
    """The connection's stream gradient (``_stream_grad_kernel``): ``x, g_out (T, n, C)`` (``g_out``
    may be ``None``), ``g_in (T, C)``, float32 ``h_pre (T, n)``, ``h_res (T, n, n)``, ``dss (T,)``,
    ``dproj (T, W)``, ``phi_t (W, n C)`` -> ``dx`` like ``x``."""
    T, n, C = x.shape
    _check(x, n)
    dx = torch.empty_like(x)
    config = stream_grad_config(T, n, C, x.element_size())
    _stream_grad_kernel[_grid(T, C, config)](
        x, g_in, x if g_out is None else g_out, h_pre, h_res, dss, dproj, phi_t, dx, T, n, C,
        W=phi_t.shape[0], HAS_GOUT=g_out is not None, **config)  # fmt: skip
    return dx


def shipped_configs(dtypes=("fp32", "bf16", "fp16")):
    """Every GPU configuration the launchers can pick: ``(name, kernel, signature, consts, launch
    options)``.

    Each kernel's widest C block (``GPU_BLOCKS``; C of 2048 or more for the whole-row kernels) for
    each padded n and stream dtype; narrower C uses smaller blocks of the same kernels with fewer
    registers per thread or as many. The merge takes the branch output ``y`` in its
    own dtype, so it is compiled for every (stream dtype, branch dtype) pair. ``pre_mix_dh`` and
    ``merge_bwd_nodx`` are the backwards without their stream gradient (the fused connection
    backward's; the latter for equal dtypes only: the compile check's time on 2 cores),
    ``stream_grad`` that gradient (with the merge's term: without it, when the merge's output has
    no gradient, the kernel is a subset of this code).
    """
    f = "*fp32"
    for np2, dt in itertools.product((1, 2, 4, 8), dtypes):
        itemsize = 4 if dt == "fp32" else 2
        s = f"*{dt}"
        pre_bwd = {"x_ptr": s, "h_ptr": f, "g_ptr": s, "dx_ptr": s, "dh_part_ptr": f}
        kernels = {  # name: (kernel, pointers, constexprs beside the launch's, launch config)
            f"pre_mix_fwd-{dt}": (_pre_mix_fwd_kernel, {"x_ptr": s, "h_ptr": f, "out_ptr": s}, {},
                                  "pre_mix_fwd"),
            f"pre_mix_bwd-{dt}": (_pre_mix_bwd_kernel, pre_bwd, {"WRITE_DX": True}, "pre_mix_bwd"),
            f"pre_mix_dh-{dt}": (_pre_mix_bwd_kernel, pre_bwd, {"WRITE_DX": False}, "pre_mix_bwd"),
        }  # fmt: skip
        for ydt in dtypes:
            y = f"*{ydt}"
            tag = dt if ydt == dt else f"{dt}-y{ydt}"
            kernels[f"merge_fwd-{tag}"] = (
                _merge_fwd_kernel,
                {"x_ptr": s, "y_ptr": y, "hpost_ptr": f, "hres_ptr": f, "out_ptr": s},
                {},
                "merge_fwd",
            )
            merge_bwd = {
                "x_ptr": s,
                "y_ptr": y,
                "hpost_ptr": f,
                "hres_ptr": f,
                "g_ptr": s,
                "dx_ptr": s,
                "dy_ptr": y,
                "dhpost_part_ptr": f,
                "dhres_part_ptr": f,
            }
            form = {"LOADS_FIRST": merge_loads_first(np2)}
            kernels[f"merge_bwd-{tag}"] = (_merge_bwd_kernel, merge_bwd,
                                           {"WRITE_DX": True, **form}, "merge_bwd")  # fmt: skip
            if ydt == dt:  # less code than merge_bwd, whose mixed-dtype variants cover y's cast
                kernels[f"merge_bwd_nodx-{tag}"] = (_merge_bwd_kernel, merge_bwd,
                                                    {"WRITE_DX": False, **form},
                                                    "merge_bwd")  # fmt: skip
            if ydt == dt and dt != "fp32":  # the tensor-core form (``MERGE_MMA``)
                for dx in (True, False):
                    kernels[f"mma_merge_bwd{'' if dx else '_nodx'}-{tag}"] = (
                        _merge_bwd_mma_kernel,
                        merge_bwd,
                        {"WRITE_DX": dx},
                        "merge_mma",
                    )
        for name, (kernel, ptrs, extra, launch) in kernels.items():
            kind, tag = name.split("-", 1)
            if launch == "merge_mma":
                consts = merge_mma_config(np2, 2**20)
            else:
                consts = launch_config(launch, 2**20, np2, 2**20, itemsize)
            warps = consts.pop("num_warps")
            tail = {
                "T": "i32",
                "n": "i32",
                "C": "i32",
                **dict.fromkeys([*consts, *extra], "constexpr"),
            }
            yield (
                f"{kind}-NP{np2}-BT{consts['BT']}-BC{consts['BC']}-{tag}",
                kernel,
                {**ptrs, **tail},
                {**consts, **extra},
                {"num_warps": warps},
            )
        grad_consts = stream_grad_config(2**20, np2, 2**20, itemsize)
        grad_warps = grad_consts.pop("num_warps")
        ptrs = {"x_ptr": s, "gin_ptr": s, "gout_ptr": s, "hpre_ptr": f, "hres_ptr": f,
                "dss_ptr": f, "dproj_ptr": f, "phit_ptr": f, "dx_ptr": s}  # fmt: skip
        consts_g = {"W": np2 * np2 + 2 * np2, "HAS_GOUT": True, **grad_consts}
        tail = {"T": "i32", "n": "i32", "C": "i32", **dict.fromkeys(consts_g, "constexpr")}
        yield (f"stream_grad-NP{np2}-BT{grad_consts['BT']}-BC{grad_consts['BC']}-{dt}",
               _stream_grad_kernel, {**ptrs, **tail}, consts_g, {"num_warps": grad_warps})  # fmt: skip


# ------------------------------------------------------------------------------ autograd (ops)


@torch.library.custom_op("mhc_kernels::pre_mix", mutates_args=())
def _pre_mix_op(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return pre_mix_fwd(x, h)


@_pre_mix_op.register_fake
def _(x, h):
    return x.new_empty((x.shape[0], x.shape[2]))


@torch.library.custom_op("mhc_kernels::pre_mix_bwd", mutates_args=())
def _pre_mix_bwd_op(x: torch.Tensor, h: torch.Tensor, g: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return pre_mix_bwd(x, h, g)


@_pre_mix_bwd_op.register_fake
def _(x, h, g):
    return torch.empty_like(x), h.new_empty(h.shape, dtype=torch.float32)


_pre_mix = differentiable(_pre_mix_op, _pre_mix_bwd_op, pre_mix_fwd, pre_mix_bwd, save_inputs,
                          backward_from_saved)  # fmt: skip


@torch.library.custom_op("mhc_kernels::merge", mutates_args=())
def _merge_op(x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
              ) -> torch.Tensor:  # fmt: skip
    return merge_fwd(x, y, h_post, h_res)


@_merge_op.register_fake
def _(x, y, h_post, h_res):
    return torch.empty_like(x)


@torch.library.custom_op("mhc_kernels::merge_bwd", mutates_args=())
def _merge_bwd_op(x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor,
                  g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return merge_bwd(x, y, h_post, h_res, g)


@_merge_bwd_op.register_fake
def _(x, y, h_post, h_res, g):
    return (torch.empty_like(x), torch.empty_like(y),
            h_post.new_empty(h_post.shape, dtype=torch.float32),
            h_res.new_empty(h_res.shape, dtype=torch.float32))  # fmt: skip


_merge = differentiable(_merge_op, _merge_bwd_op, merge_fwd, merge_bwd, save_inputs,
                        backward_from_saved)  # fmt: skip


def _pre_mix_inputs(x, h_pre):
    n, C = x.shape[-2:]
    return rows(x, n, C).contiguous(), rows(h_pre, n).float().contiguous()


def pre_mix_triton(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    return shaped(_pre_mix(*_pre_mix_inputs(x, h_pre)), (*x.shape[:-2], x.shape[-1]))


def pre_mix_backward_triton(x, h_pre, grad, want_dx: bool = True):
    """The backward kernel alone: gradients shaped and typed like the inputs (``dx`` ``None``
    unless ``want_dx``)."""
    dx, dh = pre_mix_bwd(*_pre_mix_inputs(x, h_pre), rows(grad, x.shape[-1]).contiguous(),
                         want_dx)  # fmt: skip
    return _shaped_like((dx, dh), (x, h_pre))


def _shaped_like(grads, inputs) -> tuple[torch.Tensor | None, ...]:
    """The launchers' gradients in their inputs' shapes and dtypes (as autograd would give them);
    ``None`` stays ``None``."""
    return tuple(None if g is None else shaped(g, t.shape).to(t.dtype)
                 for g, t in zip(grads, inputs, strict=True))  # fmt: skip


def _merge_inputs(x, y, h_post, h_res):
    """The kernels' layout: ``(T, n, C)``, ``(T, C)``, float32 ``(T, n)``, ``(T, n, n)``."""
    n, C = x.shape[-2:]
    # y keeps its dtype (a bf16 branch output under autocast is read as is: no fp32 copy is made
    # and saved for backward); its gradient comes back in that dtype
    y = y if y.dtype in KERNEL_DTYPES else y.to(x.dtype)
    return (
        rows(x, n, C).contiguous(),
        rows(y, C).contiguous(),
        rows(h_post, n).float().contiguous(),
        rows(h_res, n, n).float().contiguous(),
    )


def merge_triton(x, y, h_post, h_res):
    return shaped(_merge(*_merge_inputs(x, y, h_post, h_res)), x.shape)


def merge_backward_triton(x, y, h_post, h_res, grad, want_dx: bool = True):
    """The backward kernel alone: gradients shaped and typed like the inputs (``dx`` ``None``
    unless ``want_dx``)."""
    n, C = x.shape[-2:]
    grads = merge_bwd(*_merge_inputs(x, y, h_post, h_res), rows(grad, n, C).contiguous(),
                      want_dx)  # fmt: skip
    return _shaped_like(grads, (x, y, h_post, h_res))


def stream_grad_triton(x, g_in, g_out, h_pre, h_res, dsumsq, dproj, phi):
    """:func:`mhc_kernels.streams.stream_grad` by one kernel (``x`` shaped ``(..., n, C)``)."""
    n, C = x.shape[-2:]
    x3 = x.reshape(-1, n, C).contiguous()

    def like_x(t, *shape):  # the kernel reads the upstream gradients in the streams' dtype
        return t.reshape(x3.shape[0], *shape).to(x.dtype).contiguous()

    dx = stream_grad(x3, like_x(g_in, C), None if g_out is None else like_x(g_out, n, C),
                     h_pre.reshape(-1, n).float().contiguous(),
                     h_res.reshape(-1, n, n).float().contiguous(),
                     dsumsq.reshape(-1).float().contiguous(),
                     dproj.reshape(-1, phi.shape[-1]).float().contiguous(),
                     phi.T.contiguous())  # fmt: skip
    return dx.reshape(x.shape)
