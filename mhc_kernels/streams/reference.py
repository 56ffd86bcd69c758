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
from ..sinkhorn.reference import autocast_exempt, compute_dtype


@autocast_exempt
def pre_mix_reference(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """``x: (..., n, C)``, ``h_pre: (..., n)`` -> ``(..., C)``."""
    dt = compute_dtype(x.dtype)
    return torch.einsum("...j,...jc->...c", h_pre.to(dt), x.to(dt)).to(x.dtype)


@autocast_exempt
def merge_reference(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor
) -> torch.Tensor:
    """``x: (..., n, C)``, ``y: (..., C)``, ``h_post: (..., n)``, ``h_res: (..., n, n)`` -> ``(..., n, C)``."""
    dt = compute_dtype(x.dtype)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dt), x.to(dt))
    return (mixed + h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)).to(x.dtype)


@autocast_exempt
def pre_mix_coefficient_grad_reference(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`pre_mix_reference`'s ``h_pre`` alone for the upstream ``grad``:
    ``sum_c grad[t, c] x[t, j, c]`` (float32, or float64 for float64 streams)."""
    dt = compute_dtype(x.dtype)
    return torch.einsum("...jc,...c->...j", x.to(dt), grad.to(dt))


@autocast_exempt
def merge_grads_without_dx_reference(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`merge_reference` but the streams': ``dy = sum_i h_post[i] g[i]``
    (in y's dtype), ``dh_post[i] = sum_c g[i, c] y[c]``, ``dh_res[i, j] = sum_c g[i, c] x[j, c]``
    (float32, or float64 for float64 streams)."""
    dt = compute_dtype(x.dtype)
    g = grad.to(dt)
    dy = torch.einsum("...i,...ic->...c", h_post.to(dt), g).to(y.dtype)
    return dy, torch.einsum("...ic,...c->...i", g, y.to(dt)), g @ x.to(dt).transpose(-1, -2)


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
