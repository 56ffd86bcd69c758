"""Fused coefficient projection of an mHC layer: ``v @ phi`` and ``sum(v^2)`` in one read of v."""

from __future__ import annotations

import os

import torch

from ..sinkhorn import BACKEND_ENV, resolve_backend
from .reference import projection_reference


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
    if backend != "auto" or os.environ.get(BACKEND_ENV, "auto") != "auto":
        if resolve_backend(backend, v.device) == "triton":
            from .triton import projection_triton

            return projection_triton(v, phi)
    return projection_reference(v, phi)


__all__ = ["projection", "projection_reference"]
