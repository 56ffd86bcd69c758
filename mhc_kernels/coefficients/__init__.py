"""Fused coefficient projection of an mHC layer: ``v @ phi`` and ``sum(v^2)`` in one read of v."""

from __future__ import annotations

import torch

from ..sinkhorn import resolve_backend
from .reference import epilogue_reference, projection_reference


def projection(v: torch.Tensor, phi: torch.Tensor, backend: str = "auto"):
    """``v: (..., K)``, ``phi: (K, W)`` -> ``(v @ phi: (..., W), sum(v^2): (...))``.

    Triton reads the streams once for both (float32 ``phi`` only). Same ``backend`` rules as
    :func:`mhc_kernels.sinkhorn_knopp`, except that ``auto`` stays on PyTorch: on an H200 the fused
    forward ties cuBLAS but its backward is 1.5-2.5x slower (benchmarks/README.md), so the kernel
    runs only when asked for (``backend="triton"`` or ``MHC_BACKEND=triton``).

    Example:
        >>> proj, sumsq = projection(torch.ones(3, 8), torch.ones(8, 24))
        >>> proj.shape, sumsq.tolist()
        (torch.Size([3, 24]), [8.0, 8.0, 8.0])
    """
    if resolve_backend(backend, v.device, auto_triton=False) == "triton":
        from .triton import projection_triton

        return projection_triton(v, phi)
    return projection_reference(v, phi)


def epilogue(
    proj: torch.Tensor,
    sumsq: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    n: int,
    features: int,
    rms_eps: float,
    backend: str = "auto",
):
    """The coefficients from the projection: ``(H_pre, H_post, H_res logits)``, see
    :func:`epilogue_reference` for the formula. Triton does it in one kernel each way (float32
    only) instead of about a dozen small PyTorch operations; like :func:`projection`, ``auto`` stays
    on PyTorch until the kernel has been measured on a GPU.

    Example:
        >>> pre, post, res = epilogue(torch.zeros(2, 8), torch.ones(2), torch.ones(3),
        ...                           torch.zeros(8), n=2, features=4, rms_eps=0.0)
        >>> pre.tolist(), post.tolist(), res.shape
        ([[0.5, 0.5], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]], torch.Size([2, 4]))
    """
    if resolve_backend(backend, proj.device, auto_triton=False) == "triton":
        from .triton import epilogue_triton

        return epilogue_triton(proj, sumsq, alpha, bias, n, features, rms_eps)
    return epilogue_reference(proj, sumsq, alpha, bias, n, features, rms_eps)


__all__ = ["epilogue", "epilogue_reference", "projection", "projection_reference"]
