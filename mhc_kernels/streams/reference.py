"""Stream mixing in plain PyTorch: the specification of the fused kernels and the CPU path.

For ``T`` tokens (any leading shape flattened), ``n`` streams of width ``C``::

    pre_mix(x, h_pre)[t, c]            = sum_j h_pre[t, j] x[t, j, c]                    (C out)
    merge(x, y, h_post, h_res)[t, i, c] = sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] y[t, c]

and the gradient of one connection's stream input, the three terms autograd would add, in one::

    stream_grad[t, i, c] = h_pre[t, i] g_in[t, c] + sum_j h_res[t, j, i] g_out[t, j, c]
                           + 2 dsumsq[t] x[t, i, c] + sum_w dproj[t, w] phi[i C + c, w]

(the pre-mix's, the merge's and the coefficient projection's backward: ``g_in`` is the gradient of
the pre-mix output, ``g_out`` of the merge output, ``dproj`` and ``dsumsq`` of the projection).

Streams may be bf16/fp16/fp32; coefficients are fp32 and the sums run in fp32 (float64 streams stay
float64, for gradcheck); results have the streams' dtype.
"""

from __future__ import annotations

import torch

from ..coefficients.reference import projection_backward_reference
from ..sinkhorn.reference import as_dtype, autocast_exempt, compute_dtype


@autocast_exempt
def pre_mix_reference(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """``x: (..., n, C)``, ``h_pre: (..., n)`` -> ``(..., C)``."""
    return _PreMix.apply(x, h_pre)


@autocast_exempt
def merge_reference(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """``x: (..., n, C)``, ``y: (..., C)``, ``h_post: (..., n)``, ``h_res: (..., n, n)`` -> ``(..., n, C)``."""
    return _Merge.apply(x, y, h_post, h_res)


class _PreMix(torch.autograd.Function):
    """The pre-mix with its backward written out (:func:`pre_mix_backward_reference`), so that it
    saves the streams in their own dtype: autograd through the float32 expression kept a float32
    copy of bf16 streams per pre-mix and per merge, so bf16 streams saved more than float32 ones.
    Differentiable twice (plain ops)."""

    @staticmethod
    def forward(ctx, x, h_pre):
        ctx.save_for_backward(x, h_pre)
        dt = compute_dtype(x.dtype)
        return as_dtype(torch.einsum("...j,...jc->...c", h_pre.to(dt), x.to(dt)), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return pre_mix_backward_reference(*ctx.saved_tensors, grad, *ctx.needs_input_grad)


class _Merge(torch.autograd.Function):
    """The merge with its backward written out (:func:`merge_backward_reference`): saves the
    streams and the branch output ``y`` in their own dtypes, as the Triton kernels do."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res):
        ctx.save_for_backward(x, y, h_post, h_res)
        dt = compute_dtype(x.dtype)
        mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dt), x.to(dt))
        return as_dtype(mixed + h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return merge_backward_reference(*ctx.saved_tensors, grad, *ctx.needs_input_grad)


@autocast_exempt
def pre_mix_backward_reference(x, h_pre, grad, want_dx: bool = True, want_dh: bool = True):
    """The gradients of :func:`pre_mix_reference` for the upstream ``grad``: ``dx[j, c] =
    h_pre[j] grad[c]`` and ``dh_pre[j] = sum_c grad[c] x[j, c]``, each in its input's dtype and
    shape, ``None`` unless wanted; sums in float32 (float64 for float64 streams)."""
    dt = compute_dtype(x.dtype)
    g = grad.to(dt)
    dx = dh = None
    if want_dx:
        dx = _sum_to(h_pre.to(dt).unsqueeze(-1) * g.unsqueeze(-2), x)
    if want_dh:
        dh = _sum_to(torch.einsum("...jc,...c->...j", x.to(dt), g), h_pre)
    return dx, dh


@autocast_exempt
def merge_backward_reference(x, y, h_post, h_res, grad, want_dx: bool = True, want_dy: bool = True,
                             want_dh_post: bool = True, want_dh_res: bool = True):  # fmt: skip
    """The gradients of :func:`merge_reference` for the upstream ``grad``: ``dx[j] = sum_i
    h_res[i, j] g[i]``, ``dy = sum_i h_post[i] g[i]``, ``dh_post[i] = sum_c g[i, c] y[c]``,
    ``dh_res[i, j] = sum_c g[i, c] x[j, c]``, each in its input's dtype and shape, ``None`` unless
    wanted; sums in float32 (float64 for float64 streams)."""
    dt = compute_dtype(x.dtype)
    g = grad.to(dt)
    dx = dy = dh_post = dh_res = None
    if want_dx:
        dx = _sum_to(h_res.to(dt).transpose(-1, -2) @ g, x)
    if want_dy:  # these two as autograd has them for the forward's product (same rounding)
        dy = _sum_to((g * h_post.to(dt).unsqueeze(-1)).sum(-2), y)
    if want_dh_post:
        dh_post = _sum_to((g * y.to(dt).unsqueeze(-2)).sum(-1), h_post)
    if want_dh_res:
        dh_res = _sum_to(g @ x.to(dt).transpose(-1, -2), h_res)
    return dx, dy, dh_post, dh_res


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dimensions ``like`` was broadcast along, in ``like``'s dtype."""
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


@autocast_exempt
def stream_grad_reference(
    x: torch.Tensor,
    g_in: torch.Tensor,
    g_out: torch.Tensor | None,
    h_pre: torch.Tensor,
    h_res: torch.Tensor,
    dsumsq: torch.Tensor,
    dproj: torch.Tensor,
    phi: torch.Tensor,
) -> torch.Tensor:
    """``x: (..., n, C)``, ``g_in: (..., C)``, ``g_out: (..., n, C)`` or ``None`` (no merge
    gradient), ``h_pre: (..., n)``, ``h_res: (..., n, n)``, ``dsumsq: (...)``, ``dproj: (..., W)``,
    ``phi: (n C, W)`` -> ``(..., n, C)`` in the dtype of ``x``, summed in ``phi``'s or x's wider
    float dtype."""
    n, C = x.shape[-2:]
    dt = torch.promote_types(compute_dtype(x.dtype), phi.dtype)
    # the projection's term, in dt; the other terms accumulate in place: one stream tensor in all
    dx, _ = projection_backward_reference(x.to(dt).reshape(-1, n * C), phi.to(dt), dproj, dsumsq,
                                          want_dphi=False)  # fmt: skip
    dx = dx.reshape(-1, n, C)
    dx.addcmul_(h_pre.to(dt).reshape(-1, n, 1), g_in.to(dt).reshape(-1, 1, C))
    if g_out is not None:
        dx.baddbmm_(h_res.to(dt).reshape(-1, n, n).transpose(1, 2), g_out.to(dt).reshape(-1, n, C))
    return dx.reshape(x.shape).to(x.dtype)
