"""Stream mixing in plain PyTorch: the specification of the fused kernels and the CPU path.

For ``T`` tokens (any leading shape flattened), ``n`` streams of width ``C``::

    pre_mix(x, h_pre)[t, c]            = sum_j h_pre[t, j] x[t, j, c]                    (C out)
    merge(x, y, h_post, h_res)[t, i, c] = sum_j h_res[t, i, j] x[t, j, c] + h_post[t, i] y[t, c]

Streams may be bf16/fp16/fp32; coefficients are fp32 and the sums run in fp32 (float64 streams stay
float64, for gradcheck); results have the streams' dtype.
"""

from __future__ import annotations

import torch

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
