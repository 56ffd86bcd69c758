"""Fused Triton coefficient projection: ``v @ phi`` and ``sum(v^2)`` in one pass over the streams.

Limits: ``phi`` float32 with W = n^2 + 2n <= 128 columns (n <= 10), streams float32/bf16/fp16, any
K = n*C. Products run in IEEE float32 (no TF32), so results match the reference to fp32 rounding.

Forward reads v (T x K) once and phi (K x W) once per program; writes T x (W + 1) floats. Backward:
``dv = dproj @ phi^T + 2 v dsumsq`` (one kernel over tokens) and ``dphi = v^T @ dproj`` (one kernel
over K chunks that walks all tokens: no atomics, deterministic). On an H200 this backward is
1.5-2.5x slower than cuBLAS, so ``projection(..., backend="auto")`` does not use it.

The epilogue kernels turn ``(proj, sumsq)`` into the gates and H_res logits (scale, bias, sigmoid)
in one pass each way, with the parameter gradients summed per program and then over programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import differentiable
from .._host import cdiv, next_power_of_2
from ..sinkhorn.triton import interpreting


@triton.jit
def _projection_fwd_kernel(v_ptr, phi_ptr, proj_ptr, ss_ptr, T, K, W,
                           BT: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t2 = tok.to(tl.int64)[:, None]  # [BT, 1]
    w2 = tl.arange(0, WP)[None, :]  # [1, WP]
    acc = tl.zeros((BT, WP), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_row = k0 + tl.arange(0, BK)
        v = tl.load(v_ptr + t2 * K + k_row[None, :], mask=(t2 < T) & (k_row[None, :] < K),
                    other=0.0).to(tl.float32)  # [BT, BK]  # fmt: skip
        phi = tl.load(phi_ptr + k_row[:, None].to(tl.int64) * W + w2,
                      mask=(k_row[:, None] < K) & (w2 < W), other=0.0)  # [BK, WP]  # fmt: skip
        acc += tl.dot(v, phi, input_precision="ieee")
        ss += tl.sum(v * v, axis=1)
    tl.store(proj_ptr + t2 * W + w2, acc, mask=(t2 < T) & (w2 < W))
    tl.store(ss_ptr + tok, ss, mask=tok < T)


@triton.jit
def _projection_dv_kernel(v_ptr, phi_ptr, dproj_ptr, dss_ptr, dv_ptr, T, K, W,
                          BT: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t2 = tok.to(tl.int64)[:, None]
    w2 = tl.arange(0, WP)[None, :]
    dproj = tl.load(dproj_ptr + t2 * W + w2, mask=(t2 < T) & (w2 < W), other=0.0)  # [BT, WP]
    dss = tl.load(dss_ptr + tok, mask=tok < T, other=0.0)  # [BT]
    for k0 in range(0, K, BK):
        k_row = k0 + tl.arange(0, BK)
        m = (t2 < T) & (k_row[None, :] < K)
        v = tl.load(v_ptr + t2 * K + k_row[None, :], mask=m, other=0.0).to(tl.float32)
        phi = tl.load(phi_ptr + k_row[:, None].to(tl.int64) * W + w2,
                      mask=(k_row[:, None] < K) & (w2 < W), other=0.0)  # [BK, WP]  # fmt: skip
        dv = tl.dot(dproj, tl.trans(phi), input_precision="ieee") + 2.0 * v * dss[:, None]
        tl.store(dv_ptr + t2 * K + k_row[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _projection_dphi_kernel(v_ptr, dproj_ptr, dphi_ptr, T, K, W,
                            BT: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    k_row = tl.program_id(0) * BK + tl.arange(0, BK)
    w2 = tl.arange(0, WP)[None, :]
    acc = tl.zeros((BK, WP), dtype=tl.float32)
    for t0 in range(0, T, BT):
        tok = t0 + tl.arange(0, BT)
        t2 = tok.to(tl.int64)[:, None]
        v = tl.load(v_ptr + t2 * K + k_row[None, :], mask=(t2 < T) & (k_row[None, :] < K),
                    other=0.0).to(tl.float32)  # [BT, BK]  # fmt: skip
        dproj = tl.load(dproj_ptr + t2 * W + w2, mask=(t2 < T) & (w2 < W), other=0.0)
        acc += tl.dot(tl.trans(v), dproj, input_precision="ieee")  # [BK, WP]
    tl.store(dphi_ptr + k_row[:, None].to(tl.int64) * W + w2, acc,
             mask=(k_row[:, None] < K) & (w2 < W))  # fmt: skip


@triton.jit
def _epilogue_logits(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, T, n, W, inv_features, rms_eps,
                     BT: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    """This program's tile: z = alpha[part(w)] * proj / r + bias with r = sqrt(ss / K + eps).

    Returns the indices, the mask, r, each column's scale and the normalised projection q too.
    """
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t2 = tok.to(tl.int64)[:, None]
    w = tl.arange(0, WP)
    w2 = w[None, :]
    m = (t2 < T) & (w2 < W)
    p = tl.load(proj_ptr + t2 * W + w2, mask=m, other=0.0)
    r = tl.sqrt(tl.load(ss_ptr + tok, mask=tok < T, other=1.0) * inv_features + rms_eps)
    part = (w >= n).to(tl.int32) + (w >= 2 * n).to(tl.int32)  # 0 pre, 1 post, 2 res
    scale = tl.load(alpha_ptr + part, mask=w < W, other=0.0)
    q = p / r[:, None]
    z = q * scale[None, :] + tl.load(bias_ptr + w, mask=w < W, other=0.0)[None, :]
    return tok, t2, w, w2, m, r, part, scale, q, z


@triton.jit
def _epilogue_fwd_kernel(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr,
                         T, n, W, inv_features, rms_eps,
                         BT: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    # sigmoid(z) for pre, 2 sigmoid(z) for post, z for res
    tok, t2, w, w2, m, r, part, scale, q, z = _epilogue_logits(
        proj_ptr, ss_ptr, alpha_ptr, bias_ptr, T, n, W, inv_features, rms_eps, BT, WP
    )
    sig = tl.sigmoid(z)
    tl.store(pre_ptr + t2 * n + w2, sig, mask=m & (w2 < n))
    tl.store(post_ptr + t2 * n + (w2 - n), 2.0 * sig, mask=m & (w2 >= n) & (w2 < 2 * n))
    tl.store(res_ptr + t2 * (n * n) + (w2 - 2 * n), z, mask=m & (w2 >= 2 * n))


@triton.jit
def _epilogue_bwd_kernel(proj_ptr, ss_ptr, alpha_ptr, bias_ptr, gpre_ptr, gpost_ptr, gres_ptr,
                         dproj_ptr, dss_ptr, dbias_part_ptr, dalpha_part_ptr,
                         T, n, W, inv_features, rms_eps,
                         BT: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    # recompute z, then gz = dL/dz; dproj = gz * scale / r; dr = -sum_w gz * z_dyn / r with
    # z_dyn = scale * proj / r; dss = dr / (2 r) / features; per-program sums over tokens of gz
    # (-> dbias) and, per part, of gz * proj / r (-> dalpha); the caller adds the programs' sums
    pid = tl.program_id(0)
    tok, t2, w, w2, m, r, part, scale, q, z = _epilogue_logits(
        proj_ptr, ss_ptr, alpha_ptr, bias_ptr, T, n, W, inv_features, rms_eps, BT, WP
    )
    sig = tl.sigmoid(z)
    m_pre = m & (w2 < n)
    m_post = m & (w2 >= n) & (w2 < 2 * n)
    m_res = m & (w2 >= 2 * n)
    g_pre = tl.load(gpre_ptr + t2 * n + w2, mask=m_pre, other=0.0)
    g_post = tl.load(gpost_ptr + t2 * n + (w2 - n), mask=m_post, other=0.0)
    g_res = tl.load(gres_ptr + t2 * (n * n) + (w2 - 2 * n), mask=m_res, other=0.0)
    gz = (g_pre + 2.0 * g_post) * sig * (1.0 - sig) + g_res  # the masks keep the parts apart
    tl.store(dproj_ptr + t2 * W + w2, gz * scale[None, :] / r[:, None], mask=m)
    dr = -tl.sum(gz * q * scale[None, :], axis=1) / r
    tl.store(dss_ptr + tok, dr / (2.0 * r) * inv_features, mask=tok < T)
    tl.store(dbias_part_ptr + pid * W + w, tl.sum(gz, axis=0), mask=w < W)
    gq = tl.sum(gz * q, axis=0)  # [WP]
    for k in tl.static_range(3):
        tl.store(dalpha_part_ptr + pid * 3 + k, tl.sum(tl.where(part == k, gq, 0.0), axis=0))


BT, BK = 16, 32  # IEEE fp32 dot without tensor cores: larger tiles spill (ptxas -v)
INTERPRETER_BT = 1024
NUM_WARPS = 4
MAX_COLUMNS = 128


def _config(W: int) -> tuple[int, int, int]:
    wp = max(16, next_power_of_2(W))
    return (INTERPRETER_BT if interpreting() else BT), BK, wp


def projection_fwd(v: torch.Tensor, phi: torch.Tensor):
    T, K = v.shape
    W = phi.shape[1]
    if W > MAX_COLUMNS or phi.dtype != torch.float32:
        raise ValueError(f"the fused projection takes float32 phi with <= {MAX_COLUMNS} columns")
    proj = torch.empty((T, W), dtype=torch.float32, device=v.device)
    ss = torch.empty((T,), dtype=torch.float32, device=v.device)
    bt, bk, wp = _config(W)
    _projection_fwd_kernel[(cdiv(T, bt),)](v, phi, proj, ss, T, K, W, BT=bt, BK=bk, WP=wp,
                                                  num_warps=NUM_WARPS)  # fmt: skip
    return proj, ss


def projection_bwd(v, phi, dproj, dss):
    T, K = v.shape
    W = phi.shape[1]
    dv = torch.empty_like(v)
    dphi = torch.empty_like(phi)
    bt, bk, wp = _config(W)
    _projection_dv_kernel[(cdiv(T, bt),)](v, phi, dproj, dss, dv, T, K, W, BT=bt, BK=bk,
                                                 WP=wp, num_warps=NUM_WARPS)  # fmt: skip
    _projection_dphi_kernel[(cdiv(K, bk),)](v, dproj, dphi, T, K, W, BT=bt, BK=bk, WP=wp,
                                                   num_warps=NUM_WARPS)  # fmt: skip
    return dv, dphi


EPILOGUE_TILE = 1024  # [BT, WP] floats per program (2048 spilled in the backward, ptxas -v)
INTERPRETER_EPILOGUE_BT = 1024


def _epilogue_config(W: int) -> tuple[int, int]:
    wp = max(16, next_power_of_2(W))
    bt = INTERPRETER_EPILOGUE_BT if interpreting() else max(1, EPILOGUE_TILE // wp)
    return bt, wp


def epilogue_fwd(proj, ss, alpha, bias, n: int, features: int, rms_eps: float):
    T, W = proj.shape
    if any(t.dtype != torch.float32 for t in (proj, ss, alpha, bias)):
        raise ValueError("the fused coefficient epilogue takes float32 inputs (coeff_dtype)")
    pre = torch.empty((T, n), dtype=torch.float32, device=proj.device)
    post = torch.empty((T, n), dtype=torch.float32, device=proj.device)
    res = torch.empty((T, n * n), dtype=torch.float32, device=proj.device)
    bt, wp = _epilogue_config(W)
    _epilogue_fwd_kernel[(cdiv(T, bt),)](proj, ss, alpha, bias, pre, post, res, T, n, W,
                                                1.0 / features, rms_eps, BT=bt, WP=wp,
                                                num_warps=NUM_WARPS)  # fmt: skip
    return pre, post, res


def epilogue_bwd(proj, ss, alpha, bias, g_pre, g_post, g_res, n: int, features: int,
                 rms_eps: float):  # fmt: skip
    T, W = proj.shape
    bt, wp = _epilogue_config(W)
    programs = cdiv(T, bt)
    dproj = torch.empty_like(proj)
    dss = torch.empty_like(ss)
    dbias = torch.empty((programs, W), dtype=torch.float32, device=proj.device)
    dalpha = torch.empty((programs, 3), dtype=torch.float32, device=proj.device)
    _epilogue_bwd_kernel[(programs,)](proj, ss, alpha, bias, g_pre, g_post, g_res, dproj, dss,
                                      dbias, dalpha, T, n, W, 1.0 / features, rms_eps, BT=bt,
                                      WP=wp, num_warps=NUM_WARPS)  # fmt: skip
    return dproj, dss, dalpha.sum(0), dbias.sum(0)


def shipped_configs(dtypes=("fp32", "bf16", "fp16")):
    """GPU configurations: ``(name, kernel, signature, constexprs, num_warps)`` for n = 2, 4, 8
    (the projection per stream dtype; the float32 epilogue once per n)."""
    for n in (2, 4, 8):
        wp = max(16, next_power_of_2(n * n + 2 * n))
        consts = {"BT": BT, "BK": BK, "WP": wp}
        tail = {"T": "i32", "K": "i32", "W": "i32", **dict.fromkeys(consts, "constexpr")}
        for dt in dtypes:
            s, f = f"*{dt}", "*fp32"
            kernels = {
                "proj_fwd": (_projection_fwd_kernel, {"v_ptr": s, "phi_ptr": f, "proj_ptr": f,
                                                      "ss_ptr": f}),
                "proj_dv": (_projection_dv_kernel, {"v_ptr": s, "phi_ptr": f, "dproj_ptr": f,
                                                    "dss_ptr": f, "dv_ptr": s}),
                "proj_dphi": (_projection_dphi_kernel, {"v_ptr": s, "dproj_ptr": f,
                                                        "dphi_ptr": f}),
            }  # fmt: skip
            for name, (kernel, ptrs) in kernels.items():
                yield f"{name}-W{wp}-{dt}", kernel, {**ptrs, **tail}, consts, NUM_WARPS
        bt, _ = _epilogue_config(n * n + 2 * n) if not interpreting() else (1, wp)
        consts = {"BT": bt, "WP": wp}
        tail = {"T": "i32", "n": "i32", "W": "i32", "inv_features": "fp32", "rms_eps": "fp32",
                **dict.fromkeys(consts, "constexpr")}  # fmt: skip
        f = "*fp32"
        fwd = dict.fromkeys(["proj_ptr", "ss_ptr", "alpha_ptr", "bias_ptr", "pre_ptr", "post_ptr",
                             "res_ptr"], f)  # fmt: skip
        bwd = dict.fromkeys(["proj_ptr", "ss_ptr", "alpha_ptr", "bias_ptr", "gpre_ptr",
                             "gpost_ptr", "gres_ptr", "dproj_ptr", "dss_ptr", "dbias_part_ptr",
                             "dalpha_part_ptr"], f)  # fmt: skip
        yield f"epilogue_fwd-W{wp}-BT{bt}", _epilogue_fwd_kernel, {**fwd, **tail}, consts, NUM_WARPS
        yield f"epilogue_bwd-W{wp}-BT{bt}", _epilogue_bwd_kernel, {**bwd, **tail}, consts, NUM_WARPS


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


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_with(bwd):
    def backward(ctx, dproj, dss):
        v, phi = ctx.saved_tensors
        dproj = torch.zeros((v.shape[0], phi.shape[1]), device=v.device) if dproj is None else dproj
        dss = torch.zeros((v.shape[0],), device=v.device) if dss is None else dss
        return bwd(v, phi, dproj.float().contiguous(), dss.float().contiguous())

    return backward


_projection = differentiable(_projection_op, _projection_bwd_op, projection_fwd, projection_bwd,
                            _setup, _backward_with)  # fmt: skip


def projection_triton(v: torch.Tensor, phi: torch.Tensor):
    K = v.shape[-1]
    proj, ss = _projection(v.reshape(-1, K).contiguous(), phi.contiguous())
    return proj.reshape(*v.shape[:-1], phi.shape[1]), ss.reshape(v.shape[:-1])


@torch.library.custom_op("mhc_kernels::coefficient_epilogue", mutates_args=())
def _epilogue_op(proj: torch.Tensor, ss: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                 n: int, features: int, rms_eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return epilogue_fwd(proj, ss, alpha, bias, n, features, rms_eps)


@_epilogue_op.register_fake
def _(proj, ss, alpha, bias, n, features, rms_eps):
    T = proj.shape[0]
    return proj.new_empty((T, n)), proj.new_empty((T, n)), proj.new_empty((T, n * n))


@torch.library.custom_op("mhc_kernels::coefficient_epilogue_bwd", mutates_args=())
def _epilogue_bwd_op(proj: torch.Tensor, ss: torch.Tensor, alpha: torch.Tensor,
                     bias: torch.Tensor, g_pre: torch.Tensor, g_post: torch.Tensor,
                     g_res: torch.Tensor, n: int, features: int, rms_eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return epilogue_bwd(proj, ss, alpha, bias, g_pre, g_post, g_res, n, features, rms_eps)


@_epilogue_bwd_op.register_fake
def _(proj, ss, alpha, bias, g_pre, g_post, g_res, n, features, rms_eps):
    return (torch.empty_like(proj), torch.empty_like(ss), torch.empty_like(alpha),
            torch.empty_like(bias))  # fmt: skip


def _epilogue_setup(ctx, inputs, output):
    proj, ss, alpha, bias, *config = inputs
    ctx.save_for_backward(proj, ss, alpha, bias)
    ctx.config = tuple(config)


def _epilogue_backward_with(bwd):
    def backward(ctx, g_pre, g_post, g_res):
        grads = [g.contiguous() for g in (g_pre, g_post, g_res)]
        return *bwd(*ctx.saved_tensors, *grads, *ctx.config), None, None, None

    return backward


_epilogue = differentiable(_epilogue_op, _epilogue_bwd_op, epilogue_fwd, epilogue_bwd,
                          _epilogue_setup, _epilogue_backward_with)  # fmt: skip


def epilogue_triton(proj, sumsq, alpha, bias, n: int, features: int, rms_eps: float):
    W = proj.shape[-1]
    lead = proj.shape[:-1]
    pre, post, res = _epilogue(proj.reshape(-1, W).contiguous(), sumsq.reshape(-1).contiguous(),
                               alpha.contiguous(), bias.contiguous(), n, features, rms_eps)  # fmt: skip
    return pre.reshape(*lead, n), post.reshape(*lead, n), res.reshape(*lead, n * n)
