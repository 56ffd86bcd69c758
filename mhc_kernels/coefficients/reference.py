"""The coefficient projection in plain PyTorch: one pass over the flattened streams.

For ``v: (T, K)`` (K = n*C, any stream dtype) and ``phi: (K, W)`` (W = n^2 + 2n, float32)::

    proj[t]  = v[t] @ phi          (T, W)
    sumsq[t] = sum_k v[t, k]^2     (T,)      -> r = sqrt(sumsq / K + eps) in the layer

both accumulated in phi's dtype (float32, or float64 for gradcheck).
"""

from __future__ import annotations

import torch


def projection_reference(v: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v @ phi, sum(v^2))`` in the dtype of ``phi``."""
    v = v.to(phi.dtype)
    return v @ phi, v.square().sum(dim=-1)
