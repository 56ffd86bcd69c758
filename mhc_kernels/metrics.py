"""Stability metrics for stacks of residual mixing matrices (the paper's "Amax Gain Magnitude").

The gains are defined on the operator as it is *applied* to the streams, ``x_{l+1} = H_l x_l``:
the forward gain of a matrix is its largest absolute row sum (the infinity-norm: how much one output
stream can amplify the inputs), the backward gain its largest absolute column sum (the 1-norm: the
same for gradients flowing back). The composite mapping after layer ``l`` is the product
``H_l ... H_1 H_0`` of every layer up to and including ``l``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _stack(h_res: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if not isinstance(h_res, torch.Tensor):
        if len(h_res) == 0:
            raise ValueError("amax_gain needs at least one H_res matrix")
        h_res = torch.stack([h.detach().to(torch.float64) for h in h_res])
    if h_res.dim() < 3 or h_res.shape[-1] != h_res.shape[-2]:
        raise ValueError(f"h_res must be (L, ..., n, n), got {tuple(h_res.shape)}")
    h = h_res.detach().to(torch.float64)
    return h.reshape(h.shape[0], -1, *h.shape[-2:]).mean(dim=1)  # token-average: (L, n, n)


def amax_gain(h_res: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward/backward Amax gains of each layer's H_res and of their running product.

    Args:
        h_res: ``(L, ..., n, n)`` or a sequence of L tensors ``(..., n, n)``, one per layer in the
            order they are applied; any token dimensions are averaged first.

    Returns:
        A dict of float64 tensors of shape ``(L,)``: ``forward_gain``, ``backward_gain`` (single
        layer), ``composite_forward_gain``, ``composite_backward_gain`` (product of layers 0..l),
        ``max_abs_log_col_sum`` and ``composite_max_abs_log_col_sum`` (``max |log column sum|``;
        ``inf`` where a column sums to 0).

    Example:
        >>> eye = torch.eye(4).expand(3, 4, 4)
        >>> amax_gain(eye)["composite_forward_gain"]
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    h = _stack(h_res)
    composite = []
    product = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    for layer in h:
        product = layer @ product
        composite.append(product)
    comp = torch.stack(composite)

    def row_gain(m):
        return m.abs().sum(dim=-1).amax(dim=-1)

    def col_gain(m):
        return m.abs().sum(dim=-2).amax(dim=-1)

    def log_col(m):
        return m.sum(dim=-2).abs().log().abs().amax(dim=-1)

    return {
        "forward_gain": row_gain(h),
        "backward_gain": col_gain(h),
        "composite_forward_gain": row_gain(comp),
        "composite_backward_gain": col_gain(comp),
        "max_abs_log_col_sum": log_col(h),
        "composite_max_abs_log_col_sum": log_col(comp),
    }


def loss_spikes(loss, window: int = 20, factor: float = 1.5) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the previous ``window`` steps.

    Counting starts once ``min(window, 5)`` earlier steps exist.

    Example:
        >>> loss_spikes([1.0] * 10 + [2.0] + [1.0] * 5)
        1
    """
    values = np.asarray(loss, dtype=float)
    start = min(window, 5)
    return sum(
        int(values[i] > factor * np.median(values[max(0, i - window) : i]))
        for i in range(start, len(values))
    )


def recorded_h_res(model: torch.nn.Module) -> list[torch.Tensor]:
    """The ``last_h_res`` of every HyperConnection (and MHCLayer) in ``model`` with recording on, in module order."""
    from .layer import HyperConnection

    return [
        m.last_h_res
        for m in model.modules()
        if isinstance(m, HyperConnection) and m.record_h_res and m.last_h_res is not None
    ]
