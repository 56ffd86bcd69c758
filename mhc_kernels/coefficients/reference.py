"""The coefficient projection in plain PyTorch: one pass over the flattened streams.

For ``v: (T, K)`` (K = n*C, any stream dtype) and ``phi: (K, W)`` (W = n^2 + 2n, float32)::

    proj[t]  = v[t] @ phi          (T, W)
    sumsq[t] = sum_k v[t, k]^2     (T,)      -> r = sqrt(sumsq / K + eps) in the layer

both accumulated in phi's dtype (float32, or float64 for gradcheck).
"""

from __future__ import annotations

import functools

import torch

from ..sinkhorn.reference import autocast_exempt


@autocast_exempt
def projection_reference(v: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v @ phi, sum(v^2))`` in the dtype of ``phi``."""
    return _Projection.apply(v, phi)


class _Projection(torch.autograd.Function):
    """The projection with its backward written out, so that it reads v once:
    ``dv = 2 v dsumsq + dproj @ phi^T`` in one ``addmm`` (autograd's backward of the two
    expressions made three (T, K) tensors and added them: 1.6x slower on CPU at 1,024 tokens,
    same gradients bit for bit) and ``dphi = v^T @ dproj``. Saves v in its own dtype (the
    expression saved a float32 copy of bf16 streams). Differentiable twice (plain ops)."""

    @staticmethod
    def forward(ctx, v, phi):
        ctx.save_for_backward(v, phi)
        vc = v.to(phi.dtype)
        return vc @ phi, torch.linalg.vecdot(vc, vc)

    @staticmethod
    def backward(ctx, dproj, dsumsq):
        return projection_backward_reference(*ctx.saved_tensors, dproj, dsumsq,
                                             *ctx.needs_input_grad)  # fmt: skip


def projection_backward_reference(v, phi, dproj, dsumsq, want_dv: bool = True,
                                  want_dphi: bool = True):  # fmt: skip
    """The gradients of :func:`projection_reference` for ``(dproj, dsumsq)``: ``(dv, dphi)``, each
    ``None`` unless wanted (``dsumsq`` is read for ``dv`` only)."""
    vc = v.reshape(-1, v.shape[-1]).to(phi.dtype)
    dproj = dproj.reshape(-1, phi.shape[-1]).to(phi.dtype)
    dv = dphi = None
    if want_dv:
        dv = torch.addmm(vc * (2 * dsumsq.reshape(-1, 1).to(phi.dtype)), dproj, phi.T)
        dv = dv.reshape(v.shape).to(v.dtype)
    if want_dphi:
        dphi = vc.T @ dproj
    return dv, dphi


def epilogue_reference(
    proj: torch.Tensor,
    sumsq: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    n: int,
    features: int,
    rms_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, bias and gates of the coefficients: ``proj: (..., W)``, ``sumsq: (...)`` ->
    ``H_pre = sigmoid(z_pre)``, ``H_post = 2 sigmoid(z_post)``, ``z_res: (..., n*n)`` (Sinkhorn's
    input), where ``z = alpha_part * proj / r + bias`` and ``r = sqrt(sumsq / features + rms_eps)``.
    """
    r = torch.sqrt(sumsq / features + rms_eps).unsqueeze(-1)
    scale = (_parts(n, alpha.dtype, alpha.device) * alpha).sum(-1)  # alpha's part of each column
    z = torch.addcmul(bias, proj / r, scale)
    pre, post, res = z.split([n, n, n * n], dim=-1)
    return torch.sigmoid(pre), 2 * torch.sigmoid(post), res


def _parts(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n^2 + 2n, 3)``: one-hot rows saying which part (pre, post, res) each column is in. Two
    operations make the columns' scale from it (a small GPU step is bound by its host: a select,
    expand and concatenation per part were seven forward and six backward operations). Built once
    per (n, dtype, device) in eager mode; torch.compile traces the build into its graph (a cached
    call would make Dynamo warn that it ignores the cache)."""
    if torch.compiler.is_compiling():
        return _one_hot_parts(n, dtype, device)
    return _cached_parts(n, dtype, device)


def _one_hot_parts(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    part = torch.tensor([0] * n + [1] * n + [2] * (n * n), device=device)
    return torch.nn.functional.one_hot(part, 3).to(dtype)


_cached_parts = functools.cache(_one_hot_parts)
