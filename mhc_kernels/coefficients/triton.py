"""Fused Triton coefficient projection: ``v @ phi`` and ``sum(v^2)`` in one pass over the streams.

Limits: ``phi`` float32 with W = n^2 + 2n <= 128 columns (n <= 10), streams float32/bf16/fp16, any
K = n*C. Products run on bf16 tensor cores with every float32 operand split into three bf16 parts
(:mod:`mhc_kernels._split_dot`: bf16 streams as they are and phi in three parts, three dots;
float32 operands, six), which is float32's accuracy: results match the reference to fp32
rounding, as with float32 FMAs (``TENSOR_CORES = False``, the kernels' first form, 5-22x the
roofline on an H200 in 16 x 32 tiles: the FMAs, not the memory, bound them; the tensor-core form
is 1.8-2.5x faster forward+backward at 16,384 tokens). Each kernel's form and tiles per stream
dtype are ``GPU_TILES``: swept on an H200, the float32 forward is fastest on FMAs in 64 x 64 tiles
(4.0x the roofline at 4,096 tokens), the others on tensor cores (1.7-6.3x).

Every kernel's grid fills the GPU at a few thousand tokens (``_parts``): the forward splits K into
parts per token block (partial sums ``[parts, T, W]`` and ``[parts, T]``, added by the launcher),
``dv = dproj @ phi^T + 2 v dsumsq`` runs per (token block, K part), and ``dphi = v^T @ dproj`` per
(K block, token part) with partial sums; no atomics, deterministic. The first kernels ran one
program per token block (256 programs at 4,096 tokens, each walking all of K): on an H200 their
backward was 1.5-2.5x slower than cuBLAS. With the split and the swept tiles (``GPU_TILES``) the
layer runs faster with them at n = 4, C = 1488, so ``projection(..., backend="auto")`` takes them
for such streams (:func:`mhc_kernels.coefficients.triton_by_default`). Forward traffic: v once,
writes ``parts x T x (W + 1)`` floats; backward: v twice. The forward and ``dv`` on tensor cores
can also read phi split once per call into its bf16 parts (``Tiles.parts``, :func:`split_parts`:
one more launch, and about a third fewer instructions in their loops): the bf16 forward does
(``GPU_TILES``); ``dphi`` so reads the gradient ``dproj`` (not shipped until timed).

The epilogue kernels turn ``(proj, sumsq)`` into the gates and H_res (scale, bias, sigmoid and
Sinkhorn-Knopp, or the H_res logits for unconstrained hyper-connections) in one kernel each way:
tokens in Sinkhorn's ``[BLOCK, NP, NP]`` tiles and persistent programs, its iterations and exact
backward by the same jit helpers (``mhc_kernels.sinkhorn.triton``), the parameter gradients summed
per program and then over programs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._autograd import differentiable, save_inputs
from .._host import SWEPT_COLUMNS, add_parts, cdiv, multiprocessors, next_power_of_2, rows, shaped
from .._split_dot import bf16_parts, dot_by_parts, dot_f32, dot_options, dot_width
from ..sinkhorn.triton import (
    interpreting,
    launch_config,
    num_warps,
    order_axes,
    sinkhorn_tile_fwd,
    sinkhorn_tile_recompute,
    sinkhorn_tile_walk_back,
)


@triton.jit
def _parts_tile(parts_ptr, k_row, k_in, K, WP: tl.constexpr):
    """The ``[BK, WP]`` tiles at rows ``k_row`` (``k_in``: those inside the reduction) of a
    ``K``-row matrix's three bf16 parts (``split_parts``: phi's, or dphi's ``dproj``): ``hi, mid,
    lo``."""
    tile = parts_ptr + k_row[:, None].to(tl.int64) * WP + tl.arange(0, WP)[None, :]
    plane = K.to(tl.int64) * WP  # between the parts
    return (tl.load(tile, mask=k_in[:, None], other=0.0),
            tl.load(tile + plane, mask=k_in[:, None], other=0.0),
            tl.load(tile + 2 * plane, mask=k_in[:, None], other=0.0))  # fmt: skip


@triton.jit
def _projection_fwd_kernel(v_ptr, phi_ptr, proj_ptr, ss_ptr, T, K, k_per, W: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr,
                           MMA: tl.constexpr, PARTS_FP32: tl.constexpr,
                           PHI_PARTS: tl.constexpr, SUMSQ_APART: tl.constexpr):  # fmt: skip
    # grid (token blocks, K parts): this part's sums over k in [part * k_per, ... + k_per), written
    # to its own slice of proj_ptr ([parts, T, W]) and ss_ptr ([parts, T]). W is a constexpr in
    # the three kernels: as an argument it left phi's rows (W floats apart) without a known
    # alignment, so they were loaded a float at a time, each with its own 64-bit address and mask
    # (sm_90 SASS: 223 instructions per step of the bf16 forward, 164 with W a constexpr).
    # PHI_PARTS: phi_ptr holds phi's bf16 parts ([3, K, WP], split_parts) for the tensor-core dots,
    # which then need no split in the loop. SUMSQ_APART: the sum of squares from a second load of
    # v, so that v's shared tile feeds the products alone (Tiles.sumsq_apart)
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    part = tl.program_id(1)
    t2 = tok.to(tl.int64)[:, None]  # [BT, 1]
    kk = tl.arange(0, BK)
    w2 = tl.arange(0, WP)[None, :]  # [1, WP]
    k_start = part * k_per
    k_end = tl.minimum(k_start + k_per, K)
    acc = tl.zeros((BT, WP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        k_row = k0 + kk
        k_in = k_row < k_end
        v_at, v_in = v_ptr + t2 * K + k_row[None, :], (t2 < T) & k_in[None, :]
        v = tl.load(v_at, mask=v_in, other=0.0)
        if PHI_PARTS:
            hi, mid, lo = _parts_tile(phi_ptr, k_row, k_in, K, WP)
            acc = dot_by_parts(v, hi, mid, lo, acc, PARTS_FP32)
        else:
            phi = tl.load(phi_ptr + k_row[:, None].to(tl.int64) * W + w2,
                          mask=k_in[:, None] & (w2 < W), other=0.0)  # [BK, WP]  # fmt: skip
            acc = dot_f32(v, phi, acc, MMA, PARTS_FP32)
        if SUMSQ_APART:  # cache_modifier: not the same load as v's, which Triton would merge
            v = tl.load(v_at, mask=v_in, other=0.0, cache_modifier=".cg")
        vf = v.to(tl.float32)
        ss += tl.sum(vf * vf, axis=1)
    out = part.to(tl.int64) * T
    tl.store(proj_ptr + (out + t2) * W + w2, acc, mask=(t2 < T) & (w2 < W))
    tl.store(ss_ptr + out + tok, ss, mask=tok < T)


@triton.jit
def _projection_dv_kernel(v_ptr, phi_ptr, dproj_ptr, dss_ptr, dv_ptr, T, K, k_per,
                          W: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr,
                          MMA: tl.constexpr, PARTS_FP32: tl.constexpr,
                          PHI_PARTS: tl.constexpr):  # fmt: skip
    # grid (token blocks, K parts): dv = dproj @ phi^T + 2 v dss for k in this part (PHI_PARTS:
    # phi's bf16 parts given, as in the forward)
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t2 = tok.to(tl.int64)[:, None]
    kk = tl.arange(0, BK)
    w2 = tl.arange(0, WP)[None, :]
    k_start = tl.program_id(1) * k_per
    k_end = tl.minimum(k_start + k_per, K)
    dproj = tl.load(dproj_ptr + t2 * W + w2, mask=(t2 < T) & (w2 < W), other=0.0)  # [BT, WP]
    dss2 = 2.0 * tl.load(dss_ptr + tok, mask=tok < T, other=0.0)[:, None]  # [BT, 1]
    for k0 in range(k_start, k_end, BK):
        k_row = k0 + kk
        k_in = k_row < k_end
        m = (t2 < T) & k_in[None, :]
        offset = t2 * K + k_row[None, :]  # [BT, BK], v's and dv's
        v = tl.load(v_ptr + offset, mask=m, other=0.0).to(tl.float32)
        # the product from zero, then 2 v dss: accumulated onto 2 v dss (the larger term), each
        # step rounded at its scale, dv was 3-9 float32 ulps off on an H200 (FMAs and tensor
        # cores alike) against one rounding for the reference's addmm
        dv = tl.zeros((BT, BK), dtype=tl.float32)
        if PHI_PARTS:
            hi, mid, lo = _parts_tile(phi_ptr, k_row, k_in, K, WP)
            dv = dot_by_parts(dproj, tl.trans(hi), tl.trans(mid), tl.trans(lo), dv, PARTS_FP32)
        else:
            phi = tl.load(phi_ptr + k_row[:, None].to(tl.int64) * W + w2,
                          mask=k_in[:, None] & (w2 < W), other=0.0)  # [BK, WP]  # fmt: skip
            dv = dot_f32(dproj, tl.trans(phi), dv, MMA, PARTS_FP32)
        dv += v * dss2
        tl.store(dv_ptr + offset, dv.to(dv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _projection_dphi_kernel(v_ptr, dproj_ptr, dphi_ptr, T, K, t_per, W: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr,
                            MMA: tl.constexpr, PARTS_FP32: tl.constexpr,
                            DPROJ_PARTS: tl.constexpr):  # fmt: skip
    # grid (K blocks, token parts): this part's dphi = v^T @ dproj, to dphi_ptr [parts, K, W]. v is
    # loaded as v^T, a [BK, BT] tile with k (contiguous in memory) down its first axis: loaded as
    # [BT, BK] and transposed, float32 v was copied into shared memory 4 bytes at a time (the
    # transposed dot operand's layout; 16 with this, and 470 -> 306 instructions per loop step,
    # sm_90 SASS)
    k_row = tl.program_id(0) * BK + tl.arange(0, BK)
    k2 = k_row[:, None]  # [BK, 1]
    part = tl.program_id(1)
    tt = tl.arange(0, BT)
    w2 = tl.arange(0, WP)[None, :]
    t_start = part * t_per
    t_end = tl.minimum(t_start + t_per, T)
    acc = tl.zeros((BK, WP), dtype=tl.float32)
    for t0 in range(t_start, t_end, BT):
        tok = (t0 + tt).to(tl.int64)
        v_t = tl.load(v_ptr + tok[None, :] * K + k2, mask=(tok[None, :] < t_end) & (k2 < K),
                      other=0.0)  # [BK, BT], in the streams' dtype  # fmt: skip
        if DPROJ_PARTS:
            hi, mid, lo = _parts_tile(dproj_ptr, tok, tok < t_end, T, WP)
            acc = dot_by_parts(v_t, hi, mid, lo, acc, PARTS_FP32)
        else:
            t2 = tok[:, None]
            dproj = tl.load(dproj_ptr + t2 * W + w2, mask=(t2 < t_end) & (w2 < W), other=0.0)
            acc = dot_f32(v_t, dproj, acc, MMA, PARTS_FP32)  # [BK, WP]
    out = part.to(tl.int64) * K
    tl.store(dphi_ptr + (out + k_row[:, None]) * W + w2, acc,
             mask=(k_row[:, None] < K) & (w2 < W))  # fmt: skip


@triton.jit
def _split_parts_kernel(m_ptr, parts_ptr, K, W: tl.constexpr, WP: tl.constexpr,
                        BK: tl.constexpr):  # fmt: skip
    # a float32 matrix [K, W] (phi, or dphi's dproj) -> its bf16 parts [3, K, WP] (hi, mid, lo;
    # zero beyond W)
    k2 = (tl.program_id(0) * BK + tl.arange(0, BK)).to(tl.int64)[:, None]
    w2 = tl.arange(0, WP)[None, :]
    m = tl.load(m_ptr + k2 * W + w2, mask=(k2 < K) & (w2 < W), other=0.0)
    hi, mid, lo = bf16_parts(m)
    out = parts_ptr + k2 * WP + w2
    plane = K.to(tl.int64) * WP
    tl.store(out, hi, mask=k2 < K)
    tl.store(out + plane, mid, mask=k2 < K)
    tl.store(out + 2 * plane, lo, mask=k2 < K)


@triton.jit
def _epilogue_tiles(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, blk, T, n, W, inv_features, rms_eps,
                    BT: tl.constexpr, NV: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    """Token block ``blk``: normalised projections ``q = proj / r`` and logits
    ``z = alpha_part q + bias``, the pre and post gates as ``[BT, NV]`` tiles and H_res as a
    ``[BT, NP, NP]`` tile (masked entries: q = 0), with the indices and masks."""
    tok = blk * BT + tl.arange(0, BT)
    t1 = tok.to(tl.int64)
    r = tl.sqrt(tl.load(ss_ptr + tok, mask=tok < T, other=1.0) * inv_features + rms_eps)
    t2, v2 = t1[:, None], tl.arange(0, NV)[None, :]
    m2 = (t2 < T) & (v2 < n)
    r2 = r[:, None]
    q_pre = tl.load(proj_ptr + t2 * W + v2, mask=m2, other=0.0) / r2
    q_post = tl.load(proj_ptr + t2 * W + n + v2, mask=m2, other=0.0) / r2
    t3 = t1[:, None, None]
    rows, cols = tl.arange(0, NP)[None, :, None], tl.arange(0, NP)[None, None, :]
    e3 = rows * n + cols
    inside = (rows < n) & (cols < n)
    m3 = (t3 < T) & inside
    q_res = tl.load(proj_ptr + t3 * W + 2 * n + e3, mask=m3, other=0.0) / r[:, None, None]
    z_pre = tl.load(alpha_ptr) * q_pre + tl.load(bias_ptr + v2, mask=v2 < n, other=0.0)
    z_post = tl.load(alpha_ptr + 1) * q_post + tl.load(bias_ptr + n + v2, mask=v2 < n, other=0.0)
    z_res = tl.load(alpha_ptr + 2) * q_res + tl.load(bias_ptr + 2 * n + e3, mask=inside, other=0.0)
    return tok, r, t2, v2, m2, t3, e3, m3, q_pre, q_post, q_res, z_pre, z_post, z_res


@triton.jit
def _epilogue_fwd_kernel(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr,
                         T, n, W, inv_features, rms_eps, iters, eps,
                         SINKHORN: tl.constexpr, FIRST: tl.constexpr, SECOND: tl.constexpr,
                         BT: tl.constexpr, NV: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    # sigmoid(z) for pre, 2 sigmoid(z) for post, Sinkhorn(z) (or z) for res
    for blk in range(tl.program_id(0), tl.cdiv(T, BT), tl.num_programs(0)):
        tok, r, t2, v2, m2, t3, e3, m3, q_pre, q_post, q_res, z_pre, z_post, z_res = (
            _epilogue_tiles(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, blk, T, n, W, inv_features,
                            rms_eps, BT, NV, NP))  # fmt: skip
        tl.store(pre_ptr + t2 * n + v2, tl.sigmoid(z_pre), mask=m2)
        tl.store(post_ptr + t2 * n + v2, 2.0 * tl.sigmoid(z_post), mask=m2)
        if SINKHORN:
            z_res = sinkhorn_tile_fwd(tl.where(m3, z_res, float("-inf")), iters, eps, FIRST,
                                      SECOND)  # fmt: skip
        tl.store(res_ptr + t3 * (n * n) + e3, z_res, mask=m3)


@triton.jit
def _epilogue_bwd_kernel(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, gpre_ptr, gpost_ptr, gres_ptr,
                         dproj_ptr, dss_ptr, dbias_part_ptr, dalpha_part_ptr, scratch_ptr,
                         T, n, W, inv_features, rms_eps, iters, eps,
                         SINKHORN: tl.constexpr, FIRST: tl.constexpr, SECOND: tl.constexpr,
                         BT: tl.constexpr, NV: tl.constexpr, NP: tl.constexpr):  # fmt: skip
    # recompute z (and Sinkhorn's forward), then gz = dL/dz per part (Sinkhorn's adjoint for res);
    # dproj = gz * alpha / r; dr = -sum gz * alpha * q / r; dss = dr / (2 r) / features; this
    # program's sums over its tokens of gz (-> dbias) and gz * q (-> dalpha); the caller adds the
    # programs' sums
    pid = tl.program_id(0)
    slot = scratch_ptr + pid.to(tl.int64) * (2 * iters * BT * NP)  # Sinkhorn's normalisers
    a_pre, a_post, a_res = tl.load(alpha_ptr), tl.load(alpha_ptr + 1), tl.load(alpha_ptr + 2)
    # per-token-slot sums over this program's blocks, summed over the slots once at the end (a sum
    # over tokens inside the loop crossed warps through shared memory with barriers every block)
    b_pre, b_post = tl.zeros([BT, NV], tl.float32), tl.zeros([BT, NV], tl.float32)
    a_pre_sum, a_post_sum = tl.zeros([BT, NV], tl.float32), tl.zeros([BT, NV], tl.float32)
    b_res, a_res_sum = tl.zeros([BT, NP, NP], tl.float32), tl.zeros([BT, NP, NP], tl.float32)
    for blk in range(pid, tl.cdiv(T, BT), tl.num_programs(0)):
        tok, r, t2, v2, m2, t3, e3, m3, q_pre, q_post, q_res, z_pre, z_post, z_res = (
            _epilogue_tiles(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, blk, T, n, W, inv_features,
                            rms_eps, BT, NV, NP))  # fmt: skip
        if SINKHORN:
            p = sinkhorn_tile_recompute(tl.where(m3, z_res, float("-inf")), slot, iters, eps,
                                        FIRST, SECOND, BT, NP)  # fmt: skip
            g_res = tl.load(gres_ptr + t3 * (n * n) + e3, mask=m3, other=0.0)
            gz_res = sinkhorn_tile_walk_back(p, g_res, slot, iters, FIRST, SECOND, BT, NP)
        else:
            gz_res = tl.load(gres_ptr + t3 * (n * n) + e3, mask=m3, other=0.0)
        s = tl.sigmoid(z_pre)
        gz_pre = tl.load(gpre_ptr + t2 * n + v2, mask=m2, other=0.0) * s * (1.0 - s)
        s = tl.sigmoid(z_post)
        gz_post = 2.0 * tl.load(gpost_ptr + t2 * n + v2, mask=m2, other=0.0) * s * (1.0 - s)
        r2 = r[:, None]
        tl.store(dproj_ptr + t2 * W + v2, gz_pre * a_pre / r2, mask=m2)
        tl.store(dproj_ptr + t2 * W + n + v2, gz_post * a_post / r2, mask=m2)
        tl.store(dproj_ptr + t3 * W + 2 * n + e3, gz_res * a_res / r[:, None, None], mask=m3)
        gq_pre, gq_post, gq_res = gz_pre * q_pre, gz_post * q_post, gz_res * q_res
        dr = -(a_pre * tl.sum(gq_pre, axis=1) + a_post * tl.sum(gq_post, axis=1)
               + a_res * tl.sum(tl.sum(gq_res, axis=2), axis=1)) / r  # fmt: skip
        tl.store(dss_ptr + tok, dr / (2.0 * r) * inv_features, mask=tok < T)
        b_pre += gz_pre
        b_post += gz_post
        b_res += gz_res
        a_pre_sum += gq_pre
        a_post_sum += gq_post
        a_res_sum += gq_res
    v = tl.arange(0, NV)
    rows, cols = tl.arange(0, NP)[:, None], tl.arange(0, NP)[None, :]
    part = dbias_part_ptr + pid.to(tl.int64) * W
    tl.store(part + v, tl.sum(b_pre, axis=0), mask=v < n)
    tl.store(part + n + v, tl.sum(b_post, axis=0), mask=v < n)
    tl.store(part + 2 * n + rows * n + cols, tl.sum(b_res, axis=0), mask=(rows < n) & (cols < n))
    tl.store(dalpha_part_ptr + pid * 3, tl.sum(tl.sum(a_pre_sum, axis=1), axis=0))
    tl.store(dalpha_part_ptr + pid * 3 + 1, tl.sum(tl.sum(a_post_sum, axis=1), axis=0))
    tl.store(dalpha_part_ptr + pid * 3 + 2,
             tl.sum(tl.sum(tl.sum(a_res_sum, axis=2), axis=1), axis=0))  # fmt: skip


# IEEE fp32 dots without tensor cores in [BT, BK] x [BK, WP] tiles (larger tiles spill, ptxas -v)
BT, BK = 16, 32
NUM_WARPS = 4
MAX_COLUMNS = 128
PROGRAMS_PER_SM = 4

TENSOR_CORES = True  # the projection's products on bf16 tensor cores (dot_f32); False: float32 FMAs


class Tiles(NamedTuple):
    """How a projection kernel launches on a GPU: tokens per program ``BT``, K columns per step
    ``BK``, warps, the programs per SM that the split of its reduction aims at, and whether its
    products run on bf16 tensor cores (``mma``; else float32 FMAs); ``stages``: how many of the
    reduction loop's loads are in flight (Triton's ``num_stages``; 3, its default, so far);
    ``parts``: on tensor cores, the kernel's float32 operand (phi for the forward and ``dv``, the
    gradient ``dproj`` for ``dphi``) is read as its three bf16 parts, split once per call by one
    more launch (:func:`split_parts`), instead of loaded in float32 and split in every loop step
    (about a third of those loops' instructions, sm_90 SASS). ``sumsq_apart``: the forward takes
    the sum of squares from a second load of v, so that v's shared tile feeds only the products.
    Hopper's products in tiles of 64 tokens or more (``wgmma``) with ``parts`` are left in flight
    across the loop's back edge; when the sum read v's tile too, Triton gave it one buffer fewer
    than the stages and the next copy overwrote it under the product (the H200's 2-8% wrong
    sums), apart it gets one per stage (``compile_check``'s ``in_flight_safe``). It costs one
    more read of v, from L2."""

    BT: int
    BK: int
    warps: int
    per_sm: int
    mma: bool
    stages: int = 3
    parts: bool = False
    sumsq_apart: bool = False

    @property
    def splits(self) -> bool:
        """Whether the kernel reads its float32 operand's bf16 parts: ``parts`` on tensor cores."""
        return self.mma and self.parts

    def launch(self) -> dict:
        """The Triton launch options."""
        return {"num_warps": self.warps, "num_stages": self.stages}


# Each kernel's launch for up to SWEPT_COLUMNS columns (W = n^2 + 2n padded: n <= 4), keyed by
# (kernel, stream item size: 4 float32, 2 bf16/fp16): the fastest accurate launches of
# benchmarks/sweep_projection.py on an H200 at n = 4, C = 1488 and the layer's 4,096 tokens
# (benchmarks/results/sweep-projection-NVIDIA_H200-20261127T153320Z.json and, with phi's parts and
# 1-5 stages, sweep-parts-NVIDIA_H200-20261127T193202Z.json), among those whose loops end with
# their tensor-core products waited for (``compile_check``'s ``wgmma_in_flight``; since, products
# left in flight pass when ``in_flight_safe``; ms against the launch shipped before):
# - the float32 forward on FMAs, 64 tokens x 64 columns on 8 warps, so that phi's K x W floats
#   are re-read every 64 tokens rather than 16 (0.081 ms; 16 x 32 had taken 0.135). With phi's
#   parts on tensor cores, 64 x 32 took 0.063 ms, but Triton 3.6 left that loop's last product in
#   flight while the next step rewrote its A registers (undefined in PTX), so it does not ship;
# - the bf16 forward in 32 x 32 tiles with phi's parts split once per call (``parts``: 0.063
#   ms against 0.078 in 16 x 32 tiles with phi split in the loop). From 64 tokens on, tiles take
#   Hopper's wgmma: 0.047 ms at best, but 20 of those 49 launches summed 2-8% wrong on the H200,
#   the fastest accurate one too at 4 and 5 stages: v's tile had one shared buffer fewer than the
#   stages, and the next cp.async overwrote the one the loop's last product was still reading;
# - dphi 128 K columns per program, re-reading the T x W gradient every 128 columns rather than 32
#   (bf16 0.064 against 0.117 ms; float32 0.109 against 0.155);
# - dv 32 x 64 tiles (float32 0.069 ms against 0.095), bf16 with 2 loads in flight (``stages``:
#   0.052 ms; 0.059-0.061 at 3 stages, 0.053-0.054 at 4 and 5). With phi's parts, 128 x 64 took
#   0.052 ms too, one launch more.
# Wider W (n >= 5) keeps the 16 x 32 tiles, with projection_warps.
GPU_TILES = {
    ("fwd", 4): Tiles(64, 64, 8, 4, False),
    ("fwd", 2): Tiles(32, 32, 4, 4, True, parts=True),
    ("dphi", 4): Tiles(16, 128, 4, 4, True),
    ("dphi", 2): Tiles(16, 128, 4, 4, True),
    ("dv", 4): Tiles(32, 64, 4, 8, True),
    ("dv", 2): Tiles(32, 64, 4, 4, True, stages=2),
}
# launches for 16-bit streams not shipped, that the next GPU sweep times (sweep_projection --parts)
# against the shipped ones: Hopper's products left in flight across the loop's back edge, every
# operand in shared memory with a buffer per stage (compile_check's ``in_flight_safe``, which CI
# checks for them as for the shipped launches; the GPU tests run them natively at several token
# counts). Offline, sm_90 with Triton 3.6: dphi with dproj's parts, loop 146 -> 102 instructions;
# the forward in wgmma tiles with its sum of squares apart (without: 0.047 ms in the fifth lease's
# sweep, against 0.063 ms shipped, but racy)
CANDIDATE_TILES = {
    "fwd-64x32-sumsq-apart": ("fwd", Tiles(64, 32, 4, 8, True, 3, parts=True, sumsq_apart=True)),
    "fwd-128x64-sumsq-apart": ("fwd", Tiles(128, 64, 4, 4, True, 3, parts=True, sumsq_apart=True)),
    "dphi-16x128-dproj-parts": ("dphi", Tiles(16, 128, 4, 4, True, 3, parts=True)),
    "dphi-64x128-dproj-parts": ("dphi", Tiles(64, 128, 4, 2, True, 3, parts=True)),
}


def projection_warps(kernel: str, wp: int) -> int:
    """Warps of the projection's ``kernel`` (``"fwd"``, ``"dv"``, ``"dphi"``) for ``wp`` columns
    beyond SWEPT_COLUMNS: 8 for the forward and ``dphi`` above 64 columns (n = 8), whose
    ``[BT, WP]`` / ``[BK, WP]`` accumulators spilled at 4 warps (``dphi``: 32 bytes with
    vectorised loads, sm_80/sm_89; the forward: 12-20 bytes on sm_90 with the tensor-core dots,
    float32 v); 4 otherwise."""
    return 8 if kernel != "dv" and wp > 64 else NUM_WARPS


def gpu_tiles(kernel: str, wp: int, itemsize: int) -> Tiles:
    """How ``kernel`` launches on a GPU for ``wp`` padded columns and streams of ``itemsize``
    bytes; on tensor cores only where ``TENSOR_CORES`` allows them."""
    if wp <= SWEPT_COLUMNS:
        tiles = GPU_TILES[kernel, min(itemsize, 4)]
    else:
        tiles = Tiles(BT, BK, projection_warps(kernel, wp), PROGRAMS_PER_SM, True)
    return tiles if TENSOR_CORES or not tiles.mma else tiles._replace(mma=False)


# the interpreter's cost is per program step: wide K blocks, but token blocks small enough that
# the tests' few tokens still split into parts (programs per SM unused)
INTERPRETER_TILES = Tiles(16, 256, NUM_WARPS, PROGRAMS_PER_SM, True)


def projection_config(kernel: str, W: int, itemsize: int) -> tuple[int, Tiles]:
    """``(WP, tiles)``: ``W`` padded to a dot's width, and how ``kernel`` launches here (the
    interpreter: ``INTERPRETER_TILES`` in the form ``TENSOR_CORES`` says)."""
    wp = dot_width(W)
    if interpreting():
        return wp, INTERPRETER_TILES._replace(mma=TENSOR_CORES)
    return wp, gpu_tiles(kernel, wp, itemsize)


SPLIT_TILE = 2048  # elements per program of the split: 16 per thread


def split_parts(m: torch.Tensor, wp: int) -> torch.Tensor:
    """A float32 ``(K, W)`` matrix (phi, or dphi's ``dproj``) as its three bf16 parts
    (``bf16_parts``: hi, mid, lo), one ``(3, K, wp)`` tensor, zero beyond W: what kernels launched
    with ``Tiles.parts`` read."""
    K, W = m.shape
    parts = torch.empty((3, K, wp), dtype=torch.bfloat16, device=m.device)
    rows = SPLIT_TILE // wp
    _split_parts_kernel[(cdiv(K, rows),)](m, parts, K, W=W, WP=wp, BK=rows)
    return parts


def _operand(m: torch.Tensor, wp: int, tiles: Tiles) -> torch.Tensor:
    """The float32 operand ``m`` (phi, or dphi's ``dproj``) as a kernel launched with ``tiles``
    reads it: its bf16 parts (``Tiles.splits``), or itself."""
    return split_parts(m, wp) if tiles.splits else m


def _parts(blocks: int, length: int, block: int, device: torch.device, per_sm: int) -> int:
    """Length of each of the parts a reduction over ``length`` (in multiples of ``block``) is split
    into, so that ``blocks`` x parts programs fill the GPU (about ``per_sm`` per SM; 2 parts on
    CPU, which the interpreter tests exercise): a program per token block alone left most of an
    H200 idle at 4,096 tokens (256 programs, each walking all of K)."""
    if device.type == "cuda":
        wanted = per_sm * multiprocessors(device)
    else:
        wanted = 2 * blocks
    parts = max(1, min(cdiv(length, block), cdiv(wanted, blocks)))
    return cdiv(cdiv(length, parts), block) * block


def _check_weights(phi: torch.Tensor) -> None:
    if phi.shape[1] > MAX_COLUMNS or phi.dtype != torch.float32:
        raise ValueError(f"the fused projection takes float32 phi with <= {MAX_COLUMNS} columns")


def projection_fwd(v: torch.Tensor, phi: torch.Tensor):
    T, K = v.shape
    W = phi.shape[1]
    _check_weights(phi)
    if T == 0 or K == 0:
        return v.new_zeros((T, W), dtype=torch.float32), v.new_zeros((T,), dtype=torch.float32)
    wp, tiles = projection_config("fwd", W, v.element_size())
    blocks = cdiv(T, tiles.BT)
    k_per = _parts(blocks, K, tiles.BK, v.device, tiles.per_sm)
    parts = cdiv(K, k_per)
    proj = torch.empty((parts, T, W), dtype=torch.float32, device=v.device)
    ss = torch.empty((parts, T), dtype=torch.float32, device=v.device)
    _projection_fwd_kernel[(blocks, parts)](v, _operand(phi, wp, tiles), proj, ss, T, K, k_per,
                                            W=W, BT=tiles.BT, BK=tiles.BK, WP=wp,
                                            PHI_PARTS=tiles.splits, SUMSQ_APART=tiles.sumsq_apart,
                                            **dot_options(tiles.mma),
                                            **tiles.launch())  # fmt: skip
    return add_parts(proj), add_parts(ss)


def projection_bwd(v, phi, dproj, dss):
    return projection_dv(v, phi, dproj, dss), projection_dphi(v, dproj, phi)


def projection_dv(v, phi, dproj, dss):
    """``2 v dss + dproj @ phi^T`` (the gradient of ``v``, in its dtype) by the ``dv`` kernel."""
    _check_weights(phi)
    T, K = v.shape
    W = phi.shape[1]
    dv = torch.empty_like(v)
    if T == 0 or K == 0:
        return dv
    wp, tiles = projection_config("dv", W, v.element_size())
    token_blocks = cdiv(T, tiles.BT)
    k_per = _parts(token_blocks, K, tiles.BK, v.device, tiles.per_sm)
    _projection_dv_kernel[(token_blocks, cdiv(K, k_per))](v, _operand(phi, wp, tiles), dproj, dss,
                                                          dv, T, K, k_per, W=W, BT=tiles.BT,
                                                          BK=tiles.BK, WP=wp,
                                                          PHI_PARTS=tiles.splits,
                                                          **dot_options(tiles.mma),
                                                          **tiles.launch())  # fmt: skip
    return dv


def projection_dphi(v, dproj, phi):
    """``v^T @ dproj`` (float32 ``(K, W)``, the gradient of ``phi``) by the ``dphi`` kernel: v read
    once, in its dtype."""
    _check_weights(phi)
    T, K = v.shape
    W = dproj.shape[1]
    if T == 0 or K == 0:
        return torch.zeros((K, W), dtype=torch.float32, device=v.device)
    wp, tiles = projection_config("dphi", W, v.element_size())
    k_blocks = cdiv(K, tiles.BK)
    t_per = _parts(k_blocks, T, tiles.BT, v.device, tiles.per_sm)
    parts = cdiv(T, t_per)
    dphi = torch.empty((parts, K, W), dtype=torch.float32, device=v.device)
    _projection_dphi_kernel[(k_blocks, parts)](v, _operand(dproj, wp, tiles), dphi, T, K, t_per,
                                               W=W, BT=tiles.BT, BK=tiles.BK, WP=wp,
                                               DPROJ_PARTS=tiles.splits,
                                               **dot_options(tiles.mma),
                                               **tiles.launch())  # fmt: skip
    return add_parts(dphi)


EPILOGUE_TILE_ELEMS = 512  # the backward's extra tiles spilled at 1024-2048 (ptxas -v)


def _epilogue_launch(T: int, n: int, order: str, device: torch.device):
    """Sinkhorn's persistent programs over tiles of ``[BT, NP, NP]`` (its ``launch_config``), the
    gates' width and the order's tile axes."""
    bt, np2, programs = launch_config(T, n, device, EPILOGUE_TILE_ELEMS)
    first, second = order_axes(order)
    return programs, {"FIRST": first, "SECOND": second, "BT": bt, "NV": next_power_of_2(n),
                      "NP": np2, "num_warps": num_warps(np2)}  # fmt: skip


def epilogue_fwd(proj, ss, alpha, bias, n: int, features: int, rms_eps: float, iters: int,
                 order: str, eps: float):  # fmt: skip
    """``proj (T, W)``, ``ss (T,)`` -> ``H_pre (T, n)``, ``H_post (T, n)``, ``H_res (T, n, n)``:
    Sinkhorn's projection of the logits for ``iters >= 1``, the logits for ``iters = 0``."""
    T, W = proj.shape
    if any(t.dtype != torch.float32 for t in (proj, ss, alpha, bias)):
        raise ValueError("the fused coefficient epilogue takes float32 inputs (coeff_dtype)")
    pre = torch.empty((T, n), dtype=torch.float32, device=proj.device)
    post = torch.empty((T, n), dtype=torch.float32, device=proj.device)
    res = torch.empty((T, n, n), dtype=torch.float32, device=proj.device)
    if T == 0:
        return pre, post, res
    programs, config = _epilogue_launch(T, n, order, proj.device)
    _epilogue_fwd_kernel[(programs,)](proj, ss, alpha, bias, pre, post, res, T, n, W,
                                      1.0 / features, rms_eps, iters, eps, SINKHORN=iters > 0,
                                      **config)  # fmt: skip
    return pre, post, res


def epilogue_bwd(proj, ss, alpha, bias, g_pre, g_post, g_res, n: int, features: int,
                 rms_eps: float, iters: int, order: str, eps: float):  # fmt: skip
    T, W = proj.shape
    dproj, dss = torch.empty_like(proj), torch.empty_like(ss)
    if T == 0:
        return dproj, dss, torch.zeros_like(alpha), torch.zeros_like(bias)
    programs, config = _epilogue_launch(T, n, order, proj.device)
    dbias = torch.empty((programs, W), dtype=torch.float32, device=proj.device)
    dalpha = torch.empty((programs, 3), dtype=torch.float32, device=proj.device)
    scratch = torch.empty(max(1, programs * 2 * iters * config["BT"] * config["NP"]),
                          dtype=torch.float32, device=proj.device)  # fmt: skip
    _epilogue_bwd_kernel[(programs,)](proj, ss, alpha, bias, g_pre, g_post, g_res, dproj, dss,
                                      dbias, dalpha, scratch, T, n, W, 1.0 / features, rms_eps,
                                      iters, eps, SINKHORN=iters > 0, **config)  # fmt: skip
    return dproj, dss, add_parts(dalpha), add_parts(dbias)


def _projection_config(name: str, dt: str, W: int, tiles: Tiles):
    """``(kernel, signature, constexprs)`` of the projection's kernel ``name`` for streams of
    dtype ``dt`` launched with ``tiles``."""
    s, f = f"*{dt}", "*fp32"
    kernel, ptrs, per = {
        "fwd": (_projection_fwd_kernel, {"v_ptr": s, "phi_ptr": f, "proj_ptr": f, "ss_ptr": f},
                "k_per"),
        "dv": (_projection_dv_kernel, {"v_ptr": s, "phi_ptr": f, "dproj_ptr": f, "dss_ptr": f,
                                       "dv_ptr": s}, "k_per"),
        "dphi": (_projection_dphi_kernel, {"v_ptr": s, "dproj_ptr": f, "dphi_ptr": f}, "t_per"),
    }[name]  # fmt: skip
    consts = {"W": W, "BT": tiles.BT, "BK": tiles.BK, "WP": dot_width(W), **dot_options(tiles.mma)}
    # the operand read as bf16 parts with Tiles.parts: phi, or dphi's dproj
    operand, flag = ("dproj", "DPROJ") if name == "dphi" else ("phi", "PHI")
    consts[f"{flag}_PARTS"] = tiles.splits
    ptrs[f"{operand}_ptr"] = "*bf16" if tiles.splits else f
    if name == "fwd":
        consts["SUMSQ_APART"] = tiles.sumsq_apart
    sig = {**ptrs, "T": "i32", "K": "i32", per: "i32", **dict.fromkeys(consts, "constexpr")}
    return kernel, sig, consts


def shipped_configs(dtypes=("fp32", "bf16", "fp16")):
    """GPU configurations: ``(name, kernel, signature, constexprs, launch options)`` for n = 2, 4, 8
    (the projection per stream dtype, and the split into bf16 parts where a launch reads them; the
    float32 epilogue per n with and without Sinkhorn), and the bf16 ``CANDIDATE_TILES`` (n = 4),
    which the GPU tests run too."""
    for n in (2, 4, 8):
        W = n * n + 2 * n
        wp = dot_width(W)
        split = False
        for dt in dtypes:
            for name in ("fwd", "dv", "dphi"):
                tiles = gpu_tiles(name, wp, 4 if dt == "fp32" else 2)
                split |= tiles.splits
                yield (f"proj_{name}-W{wp}-{dt}", *_projection_config(name, dt, W, tiles),
                       tiles.launch())  # fmt: skip
            if n == 4 and dt == "bf16":
                for label, (name, tiles) in CANDIDATE_TILES.items():
                    yield (f"proj_{name}-W{wp}-{dt}-candidate-{label}",
                           *_projection_config(name, dt, W, tiles), tiles.launch())  # fmt: skip
        if split:
            consts = {"W": W, "WP": wp, "BK": SPLIT_TILE // wp}
            sig = {"m_ptr": "*fp32", "parts_ptr": "*bf16", "K": "i32",
                   **dict.fromkeys(consts, "constexpr")}  # fmt: skip
            yield f"split_parts-W{wp}", _split_parts_kernel, sig, consts, {"num_warps": 4}
        np2 = next_power_of_2(n)
        bt = max(1, EPILOGUE_TILE_ELEMS // (np2 * np2))
        for iters in (0, 20):
            consts = {"SINKHORN": iters > 0, "FIRST": 1, "SECOND": 2, "BT": bt,
                      "NV": next_power_of_2(n), "NP": np2}  # fmt: skip
            tail = {"T": "i32", "n": "i32", "W": "i32", "inv_features": "fp32",
                    "rms_eps": "fp32", "iters": "i32", "eps": "fp32",
                    **dict.fromkeys(consts, "constexpr")}  # fmt: skip
            f = "*fp32"
            fwd = dict.fromkeys(["proj_ptr", "ss_ptr", "alpha_ptr", "bias_ptr", "pre_ptr",
                                 "post_ptr", "res_ptr"], f)  # fmt: skip
            bwd = dict.fromkeys(["proj_ptr", "ss_ptr", "alpha_ptr", "bias_ptr", "gpre_ptr",
                                 "gpost_ptr", "gres_ptr", "dproj_ptr", "dss_ptr", "dbias_part_ptr",
                                 "dalpha_part_ptr", "scratch_ptr"], f)  # fmt: skip
            what = "sinkhorn" if iters else "logits"
            for name, kernel, ptrs in (("fwd", _epilogue_fwd_kernel, fwd),
                                       ("bwd", _epilogue_bwd_kernel, bwd)):  # fmt: skip
                yield (f"epilogue_{name}-{what}-NP{np2}-BT{bt}", kernel, {**ptrs, **tail}, consts,
                       {"num_warps": num_warps(np2)})  # fmt: skip


@torch.library.custom_op("mhc_kernels::projection", mutates_args=())
def _projection_op(v: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return projection_fwd(v, phi)


@_projection_op.register_fake
def _(v, phi):
    return v.new_empty((v.shape[0], phi.shape[1]), dtype=torch.float32), v.new_empty(
        (v.shape[0],), dtype=torch.float32
    )


@torch.library.custom_op("mhc_kernels::projection_bwd", mutates_args=())
def _projection_bwd_op(v: torch.Tensor, phi: torch.Tensor, dproj: torch.Tensor,
                       dss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return projection_bwd(v, phi, dproj, dss)


@_projection_bwd_op.register_fake
def _(v, phi, dproj, dss):
    return torch.empty_like(v), torch.empty_like(phi)


def _backward_with(bwd):
    def backward(ctx, dproj, dss):
        v, phi = ctx.saved_tensors
        dproj = torch.zeros((v.shape[0], phi.shape[1]), device=v.device) if dproj is None else dproj
        dss = torch.zeros((v.shape[0],), device=v.device) if dss is None else dss
        return bwd(v, phi, dproj.float().contiguous(), dss.float().contiguous())

    return backward


_projection = differentiable(_projection_op, _projection_bwd_op, projection_fwd, projection_bwd,
                            save_inputs, _backward_with)  # fmt: skip


def projection_triton(v: torch.Tensor, phi: torch.Tensor):
    K = v.shape[-1]
    proj, ss = _projection(v.reshape(-1, K).contiguous(), phi.contiguous())
    return proj.reshape(*v.shape[:-1], phi.shape[1]), ss.reshape(v.shape[:-1])


@torch.library.custom_op("mhc_kernels::coefficient_epilogue", mutates_args=())
def _epilogue_op(proj: torch.Tensor, ss: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                 n: int, features: int, rms_eps: float, iters: int, order: str, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return epilogue_fwd(proj, ss, alpha, bias, n, features, rms_eps, iters, order, eps)


@_epilogue_op.register_fake
def _(proj, ss, alpha, bias, n, features, rms_eps, iters, order, eps):
    T = proj.shape[0]
    return proj.new_empty((T, n)), proj.new_empty((T, n)), proj.new_empty((T, n, n))


@torch.library.custom_op("mhc_kernels::coefficient_epilogue_bwd", mutates_args=())
def _epilogue_bwd_op(proj: torch.Tensor, ss: torch.Tensor, alpha: torch.Tensor,
                     bias: torch.Tensor, g_pre: torch.Tensor, g_post: torch.Tensor,
                     g_res: torch.Tensor, n: int, features: int, rms_eps: float, iters: int,
                     order: str, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return epilogue_bwd(proj, ss, alpha, bias, g_pre, g_post, g_res, n, features, rms_eps, iters,
                        order, eps)  # fmt: skip


@_epilogue_bwd_op.register_fake
def _(proj, ss, alpha, bias, g_pre, g_post, g_res, n, features, rms_eps, iters, order, eps):
    return (torch.empty_like(proj), torch.empty_like(ss), torch.empty_like(alpha),
            torch.empty_like(bias))  # fmt: skip


def _epilogue_setup(ctx, inputs, output):
    proj, ss, alpha, bias, *config = inputs
    ctx.save_for_backward(proj, ss, alpha, bias)
    ctx.config = tuple(config)


def _epilogue_backward_with(bwd):
    def backward(ctx, g_pre, g_post, g_res):
        grads = [g.contiguous() for g in (g_pre, g_post, g_res)]
        return *bwd(*ctx.saved_tensors, *grads, *ctx.config), *(None,) * len(ctx.config)

    return backward


_epilogue = differentiable(_epilogue_op, _epilogue_bwd_op, epilogue_fwd, epilogue_bwd,
                          _epilogue_setup, _epilogue_backward_with)  # fmt: skip


def epilogue_triton(proj, sumsq, alpha, bias, n: int, features: int, rms_eps: float,
                    iters: int = 0, order: str = "col_row", eps: float = 0.0):  # fmt: skip
    """Gates and H_res (``(..., n, n)``: Sinkhorn's projection when ``iters >= 1``, else the
    logits) in one kernel each way."""
    W = proj.shape[-1]
    lead = proj.shape[:-1]
    pre, post, res = _epilogue(rows(proj, W).contiguous(), rows(sumsq).contiguous(),
                               alpha.contiguous(), bias.contiguous(), n, features, rms_eps, iters,
                               order, eps)  # fmt: skip
    return shaped(pre, (*lead, n)), shaped(post, (*lead, n)), shaped(res, (*lead, n, n))
