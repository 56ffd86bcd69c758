"""Stream mixing of an mHC layer: pre-mix ``H_pre x`` and post/residual merge ``H_res x + H_post^T y``."""

from __future__ import annotations

import torch

from .._host import MAX_FUSED_STREAMS
from ..sinkhorn import resolve_backend
from .reference import (
    merge_backward_reference,
    merge_reference,
    pre_mix_backward_reference,
    pre_mix_reference,
    stream_grad_reference,
)


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    """``auto`` keeps n > 8 on PyTorch (the kernels stop there); an explicit ``triton`` errors."""
    if backend == "auto" and x.shape[-2] > MAX_FUSED_STREAMS:
        return False
    return resolve_backend(backend, x.device) == "triton"


def pre_mix(x: torch.Tensor, h_pre: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``x: (..., n, C)``, ``h_pre: (..., n)`` -> ``sum_j h_pre[j] x[j]``: ``(..., C)``.

    Same ``backend`` rules as :func:`mhc_kernels.sinkhorn_knopp` (Triton fuses it for n <= 8).

    Example:
        >>> pre_mix(torch.ones(2, 4, 8), torch.full((2, 4), 0.25)).shape
        torch.Size([2, 8])
    """
    if _use_triton(backend, x):
        from .triton import pre_mix_triton

        return pre_mix_triton(x, h_pre)
    return pre_mix_reference(x, h_pre)


def merge(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """``H_res x + H_post^T y``: ``x (..., n, C)``, ``y (..., C)``, ``h_post (..., n)``,
    ``h_res (..., n, n)`` -> ``(..., n, C)`` in the dtype of ``x``.

    Example:
        >>> merge(torch.ones(2, 4, 8), torch.ones(2, 8), torch.ones(2, 4), torch.eye(4).expand(2, 4, 4)).shape
        torch.Size([2, 4, 8])
    """
    if _use_triton(backend, x):
        from .triton import merge_triton

        return merge_triton(x, y, h_post, h_res)
    return merge_reference(x, y, h_post, h_res)


def pre_mix_backward(x, h_pre, grad, backend: str = "auto", want_dx: bool = True):
    """The gradients of :func:`pre_mix` for the upstream gradient ``grad``: ``(dx, dh_pre)`` in
    the inputs' dtypes, as autograd would give them; the Triton path runs only the backward
    kernel (recomputation uses it). ``want_dx=False`` returns ``(None, dh_pre)`` without computing
    ``dx`` (the fused connection backward writes it with :func:`stream_grad`)."""
    if _use_triton(backend, x):
        from .triton import pre_mix_backward_triton

        return pre_mix_backward_triton(x, h_pre, grad, want_dx)
    return pre_mix_backward_reference(x, h_pre, grad, want_dx)


def merge_backward(x, y, h_post, h_res, grad, backend: str = "auto", want_dx: bool = True):
    """The gradients of :func:`merge` for the upstream gradient ``grad``: ``(dx, dy, dh_post,
    dh_res)`` in the inputs' dtypes, as autograd would give them. The Triton path runs only the
    backward kernel (the forward is not re-run): recomputation uses it. ``want_dx=False``: ``dx``
    is ``None``, not computed.
    """
    if _use_triton(backend, x):
        from .triton import merge_backward_triton

        return merge_backward_triton(x, y, h_post, h_res, grad, want_dx)
    return merge_backward_reference(x, y, h_post, h_res, grad, want_dx)


def stream_grad(x, g_in, g_out, h_pre, h_res, dsumsq, dproj, phi, backend: str = "auto"):
    """The gradient of a connection's stream input ``x`` in one pass: the pre-mix's (upstream
    ``g_in``), the merge's (``g_out``, or ``None``) and the coefficient projection's (``dproj``,
    ``dsumsq``, weights ``phi``) terms, which autograd would otherwise compute as three stream
    tensors and add (:func:`stream_grad_reference` has the formula). Same ``backend`` rules as
    :func:`pre_mix`; the Triton kernel takes float32 ``phi`` (``auto`` leaves float64 to PyTorch).
    """
    if _use_triton(backend, x):
        if phi.dtype == torch.float32:
            from .triton import stream_grad_triton

            return stream_grad_triton(x, g_in, g_out, h_pre, h_res, dsumsq, dproj, phi)
        if backend == "triton":
            raise ValueError("the fused stream gradient takes float32 phi (coeff_dtype=float32)")
    return stream_grad_reference(x, g_in, g_out, h_pre, h_res, dsumsq, dproj, phi)


__all__ = ["merge", "merge_backward", "merge_reference", "pre_mix", "pre_mix_backward",
           "pre_mix_reference", "stream_grad", "stream_grad_reference"]  # fmt: skip
