"""Fused coefficient projection of an mHC layer: ``v @ phi`` and ``sum(v^2)`` in one read of v."""

from __future__ import annotations

import torch

from ..sinkhorn import resolve_backend
from .reference import projection_reference


def projection(v: torch.Tensor, phi: torch.Tensor, backend: str = "auto"):
    """``v: (..., K)``, ``phi: (K, W)`` -> ``(v @ phi: (..., W), sum(v^2): (...))``.

    Triton reads the streams once for both (float32 ``phi`` only; ``auto`` keeps float64 on
    PyTorch). Same ``backend`` rules as :func:`mhc_kernels.sinkhorn_knopp`.

    Example:
        >>> proj, sumsq = projection(torch.ones(3, 8), torch.ones(8, 24))
        >>> proj.shape, sumsq.tolist()
        (torch.Size([3, 24]), [8.0, 8.0, 8.0])
    """
    if not (backend == "auto" and phi.dtype != torch.float32):
        if resolve_backend(backend, v.device) == "triton":
            from .triton import projection_triton

            return projection_triton(v, phi)
    return projection_reference(v, phi)


__all__ = ["projection", "projection_reference"]
