"""Fused Triton stream mixing: pre-mix and post/residual merge, forward and backward.

Limits: n up to 8 (tiles pad n to a power of two), any C (chunks of ``BLOCK_C`` with masks; a
multiple of 8 keeps loads vectorised); streams float32/float16/bfloat16, coefficients float32.
Each program owns ``BLOCK_T`` tokens, keeps their coefficients in registers and walks C in chunks.

Traffic per token (the fused layer's point, paper §4.3): pre-mix reads n*C, writes C; merge reads
(n + 1)*C, writes n*C. Backward: pre-mix reads (n + 1)*C and writes n*C plus n coefficient
gradients; merge reads (2n + 1)*C and writes (n + 1)*C plus n^2 + n coefficient gradients. The
coefficient gradients reduce over C inside the program (no atomics), so nothing but C-length rows
and n^2 + 2n floats per token ever leave a program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sinkhorn.triton import interpreting

# --------------------------------------------------------------------------------------- kernels


@triton.jit
def _pre_mix_fwd_kernel(x_ptr, h_ptr, out_ptr, T, n, C,
                        BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t3 = tok.to(tl.int64)[:, None, None]  # [BT, 1, 1]
    j3 = tl.arange(0, NP)[None, :, None]
    h = tl.load(
        h_ptr + tok.to(tl.int64)[:, None] * n + tl.arange(0, NP)[None, :],
        mask=(tok[:, None] < T) & (tl.arange(0, NP)[None, :] < n),
        other=0.0,
    )  # [BT, NP]
    for c0 in range(0, C, BC):
        c3 = c0 + tl.arange(0, BC)[None, None, :]
        m3 = (t3 < T) & (j3 < n) & (c3 < C)
        x = tl.load(x_ptr + t3 * n * C + j3 * C + c3, mask=m3, other=0.0).to(tl.float32)
        out = tl.sum(h[:, :, None] * x, axis=1)  # [BT, BC]
        c2 = c0 + tl.arange(0, BC)[None, :]
        tl.store(out_ptr + tok.to(tl.int64)[:, None] * C + c2, out.to(out_ptr.dtype.element_ty),
                 mask=(tok[:, None] < T) & (c2 < C))  # fmt: skip


@triton.jit
def _pre_mix_bwd_kernel(x_ptr, h_ptr, g_ptr, dx_ptr, dh_ptr, T, n, C,
                        BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    t3 = tok.to(tl.int64)[:, None, None]
    j3 = tl.arange(0, NP)[None, :, None]
    h_mask = (tok[:, None] < T) & (tl.arange(0, NP)[None, :] < n)
    h_offs = tok.to(tl.int64)[:, None] * n + tl.arange(0, NP)[None, :]
    h = tl.load(h_ptr + h_offs, mask=h_mask, other=0.0)  # [BT, NP]
    dh = tl.zeros((BT, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c3 = c0 + tl.arange(0, BC)[None, None, :]
        m3 = (t3 < T) & (j3 < n) & (c3 < C)
        c2 = c0 + tl.arange(0, BC)[None, :]
        g = tl.load(
            g_ptr + tok.to(tl.int64)[:, None] * C + c2,
            mask=(tok[:, None] < T) & (c2 < C),
            other=0.0,
        ).to(tl.float32)  # [BT, BC]
        x = tl.load(x_ptr + t3 * n * C + j3 * C + c3, mask=m3, other=0.0).to(tl.float32)
        tl.store(dx_ptr + t3 * n * C + j3 * C + c3,
                 (h[:, :, None] * g[:, None, :]).to(dx_ptr.dtype.element_ty), mask=m3)  # fmt: skip
        dh += tl.sum(g[:, None, :] * x, axis=2)
    tl.store(dh_ptr + h_offs, dh, mask=h_mask)


@triton.jit
def _merge_fwd_kernel(x_ptr, y_ptr, hpost_ptr, hres_ptr, out_ptr, T, n, C,
                      BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tl64 = tok.to(tl.int64)
    i2 = tl.arange(0, NP)[None, :]
    hpost = tl.load(hpost_ptr + tl64[:, None] * n + i2, mask=(tok[:, None] < T) & (i2 < n),
                    other=0.0)  # [BT, NP]  # fmt: skip
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    t3 = tl64[:, None, None]
    hres = tl.load(hres_ptr + t3 * n * n + i3 * n + j3, mask=(t3 < T) & (i3 < n) & (j3 < n),
                   other=0.0)  # [BT, NP(i), NP(j)]  # fmt: skip
    for c0 in range(0, C, BC):
        c3 = c0 + tl.arange(0, BC)[None, None, :]
        m3 = (t3 < T) & (i3 < n) & (c3 < C)
        x = tl.load(x_ptr + t3 * n * C + i3 * C + c3, mask=m3, other=0.0).to(
            tl.float32
        )  # [BT, NP(j), BC]
        c2 = c0 + tl.arange(0, BC)[None, :]
        y = tl.load(y_ptr + tl64[:, None] * C + c2, mask=(tok[:, None] < T) & (c2 < C),
                    other=0.0).to(tl.float32)  # [BT, BC]  # fmt: skip
        mixed = tl.sum(hres[:, :, :, None] * x[:, None, :, :], axis=2)  # [BT, NP(i), BC]
        out = mixed + hpost[:, :, None] * y[:, None, :]
        tl.store(out_ptr + t3 * n * C + i3 * C + c3, out.to(out_ptr.dtype.element_ty), mask=m3)


@triton.jit
def _merge_bwd_kernel(x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr, dhpost_ptr,
                      dhres_ptr, T, n, C,
                      BT: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    tl64 = tok.to(tl.int64)
    i2 = tl.arange(0, NP)[None, :]
    p_mask = (tok[:, None] < T) & (i2 < n)
    hpost = tl.load(hpost_ptr + tl64[:, None] * n + i2, mask=p_mask, other=0.0)  # [BT, NP]
    i3 = tl.arange(0, NP)[None, :, None]
    j3 = tl.arange(0, NP)[None, None, :]
    t3 = tl64[:, None, None]
    r_mask = (t3 < T) & (i3 < n) & (j3 < n)
    r_offs = t3 * n * n + i3 * n + j3
    hres = tl.load(hres_ptr + r_offs, mask=r_mask, other=0.0)  # [BT, NP(i), NP(j)]
    dhres = tl.zeros((BT, NP, NP), dtype=tl.float32)
    dhpost = tl.zeros((BT, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        c3 = c0 + tl.arange(0, BC)[None, None, :]
        m3 = (t3 < T) & (i3 < n) & (c3 < C)
        s_offs = t3 * n * C + i3 * C + c3
        x = tl.load(x_ptr + s_offs, mask=m3, other=0.0).to(tl.float32)  # [BT, NP(j), BC]
        g = tl.load(g_ptr + s_offs, mask=m3, other=0.0).to(tl.float32)  # [BT, NP(i), BC]
        c2 = c0 + tl.arange(0, BC)[None, :]
        m2 = (tok[:, None] < T) & (c2 < C)
        y = tl.load(y_ptr + tl64[:, None] * C + c2, mask=m2, other=0.0).to(tl.float32)
        dx = tl.sum(hres[:, :, :, None] * g[:, :, None, :], axis=1)  # [BT, NP(j), BC]
        tl.store(dx_ptr + s_offs, dx.to(dx_ptr.dtype.element_ty), mask=m3)
        dy = tl.sum(hpost[:, :, None] * g, axis=1)  # [BT, BC]
        tl.store(dy_ptr + tl64[:, None] * C + c2, dy.to(dy_ptr.dtype.element_ty), mask=m2)
        dhres += tl.sum(g[:, :, None, :] * x[:, None, :, :], axis=3)
        dhpost += tl.sum(g * y[:, None, :], axis=2)
    tl.store(dhres_ptr + r_offs, dhres, mask=r_mask)
    tl.store(dhpost_ptr + tl64[:, None] * n + i2, dhpost, mask=p_mask)


# -------------------------------------------------------------------------------------- launchers

BLOCK_C = 64
GPU_TILE_ELEMS = 2048  # elements of the largest temporary, [BT, NP, NP, BLOCK_C]; no spills at 2048
INTERPRETER_TILE_ELEMS = 2**18
MAX_GPU_TOKENS = 16  # n = 1 merge backward spills at 32 tokens per program
NUM_WARPS = 4


def launch_config(tokens: int, n: int) -> tuple[int, int, int]:
    """``(BT, NP, BLOCK_C)``: tokens per program, padded n, C chunk."""
    np2 = triton.next_power_of_2(n)
    bt = _tokens_per_program(np2, INTERPRETER_TILE_ELEMS if interpreting() else GPU_TILE_ELEMS)
    return min(triton.next_power_of_2(max(tokens, 1)), bt), np2, BLOCK_C


def _tokens_per_program(np2: int, budget: int) -> int:
    cap = None if budget == INTERPRETER_TILE_ELEMS else MAX_GPU_TOKENS
    bt = triton.next_power_of_2(max(1, budget // (np2 * np2 * BLOCK_C)))
    return min(bt, cap) if cap else bt


def _check(x: torch.Tensor, n: int):
    if n > 8:
        raise ValueError(f"the fused stream kernels take n <= 8 streams, got {n}")


def pre_mix_fwd(x, h):
    T, n, C = x.shape
    _check(x, n)
    out = torch.empty((T, C), dtype=x.dtype, device=x.device)
    bt, np2, bc = launch_config(T, n)
    _pre_mix_fwd_kernel[(triton.cdiv(T, bt),)](x, h, out, T, n, C, BT=bt, NP=np2, BC=bc,
                                               num_warps=NUM_WARPS)  # fmt: skip
    return out


def pre_mix_bwd(x, h, g):
    T, n, C = x.shape
    dx = torch.empty_like(x)
    dh = torch.empty((T, n), dtype=torch.float32, device=x.device)
    bt, np2, bc = launch_config(T, n)
    _pre_mix_bwd_kernel[(triton.cdiv(T, bt),)](x, h, g, dx, dh, T, n, C, BT=bt, NP=np2, BC=bc,
                                               num_warps=NUM_WARPS)  # fmt: skip
    return dx, dh


def merge_fwd(x, y, h_post, h_res):
    T, n, C = x.shape
    _check(x, n)
    out = torch.empty_like(x)
    bt, np2, bc = launch_config(T, n)
    _merge_fwd_kernel[(triton.cdiv(T, bt),)](x, y, h_post, h_res, out, T, n, C, BT=bt, NP=np2,
                                             BC=bc, num_warps=NUM_WARPS)  # fmt: skip
    return out


def merge_bwd(x, y, h_post, h_res, g):
    T, n, C = x.shape
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    dh_post = torch.empty((T, n), dtype=torch.float32, device=x.device)
    dh_res = torch.empty((T, n, n), dtype=torch.float32, device=x.device)
    bt, np2, bc = launch_config(T, n)
    _merge_bwd_kernel[(triton.cdiv(T, bt),)](x, y, h_post, h_res, g, dx, dy, dh_post, dh_res,
                                             T, n, C, BT=bt, NP=np2, BC=bc,
                                             num_warps=NUM_WARPS)  # fmt: skip
    return dx, dy, dh_post, dh_res


def shipped_configs(dtypes=("fp32", "bf16", "fp16")):
    """Every GPU configuration the launchers can pick: ``(name, kernel, signature, consts, warps)``."""
    for np2 in (1, 2, 4, 8):
        bt = _tokens_per_program(np2, GPU_TILE_ELEMS)
        consts = {"BT": bt, "NP": np2, "BC": BLOCK_C}
        tail = {"T": "i32", "n": "i32", "C": "i32", **dict.fromkeys(consts, "constexpr")}
        for dt in dtypes:
            s, f = f"*{dt}", "*fp32"
            kernels = {
                "pre_mix_fwd": (_pre_mix_fwd_kernel, {"x_ptr": s, "h_ptr": f, "out_ptr": s}),
                "pre_mix_bwd": (_pre_mix_bwd_kernel, {"x_ptr": s, "h_ptr": f, "g_ptr": s,
                                                      "dx_ptr": s, "dh_ptr": f}),
                "merge_fwd": (_merge_fwd_kernel, {"x_ptr": s, "y_ptr": s, "hpost_ptr": f,
                                                  "hres_ptr": f, "out_ptr": s}),
                "merge_bwd": (_merge_bwd_kernel, {"x_ptr": s, "y_ptr": s, "hpost_ptr": f,
                                                  "hres_ptr": f, "g_ptr": s, "dx_ptr": s,
                                                  "dy_ptr": s, "dhpost_ptr": f, "dhres_ptr": f}),
            }  # fmt: skip
            for name, (kernel, ptrs) in kernels.items():
                yield f"{name}-NP{np2}-BT{bt}-{dt}", kernel, {**ptrs, **tail}, consts, NUM_WARPS


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


def _pre_mix_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _pre_mix_backward(ctx, g):
    x, h = ctx.saved_tensors
    return _pre_mix_bwd_op(x, h, g.contiguous())


_pre_mix_op.register_autograd(_pre_mix_backward, setup_context=_pre_mix_setup)


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


def _merge_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _merge_backward(ctx, g):
    return _merge_bwd_op(*ctx.saved_tensors, g.contiguous())


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


def pre_mix_triton(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    n, C = x.shape[-2:]
    out = _pre_mix_op(x.reshape(-1, n, C).contiguous(), h_pre.reshape(-1, n).float().contiguous())
    return out.reshape(*x.shape[:-2], C)


def merge_triton(x, y, h_post, h_res):
    n, C = x.shape[-2:]
    out = _merge_op(x.reshape(-1, n, C).contiguous(), y.reshape(-1, C).to(x.dtype).contiguous(),
                    h_post.reshape(-1, n).float().contiguous(),
                    h_res.reshape(-1, n, n).float().contiguous())  # fmt: skip
    return out.reshape(x.shape)
