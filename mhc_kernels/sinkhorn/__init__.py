"""Sinkhorn-Knopp projection of batched n x n logits onto (near) doubly stochastic matrices."""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import ORDER_DIMS, sinkhorn_knopp_reference

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MHC_BACKEND"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# Looked up once at import (~15 us a lookup), and a plain global so that torch.compile can trace
# through resolve_backend: Dynamo refuses to trace importlib.util.find_spec.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_FOUND


def triton_can_run(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not."""
    if not triton_available():
        return False, "the 'triton' package is not installed (it ships for Linux x86_64)"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type == "cpu":
        return True, ""
    return False, (
        f"Triton kernels need a CUDA tensor (got a {device.type} tensor); move it to a GPU, "
        "set TRITON_INTERPRET=1 before importing mhc_kernels to run them on CPU, "
        "or use backend='torch'"
    )


def resolve_backend(backend: str, device: torch.device, *, auto_triton: bool = True) -> str:
    """Turn ``"auto"`` (or the ``MHC_BACKEND`` environment variable) into a concrete backend.

    ``auto_triton=False`` is for kernels that run only when asked for, or only where they were
    measured faster (the projection's and the epilogue's callers decide per call): then ``"auto"``
    with no ``MHC_BACKEND`` is ``"torch"`` even on a GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        backend = forced
    if backend == "auto":
        on_gpu = device.type == "cuda" and triton_available()
        return "triton" if auto_triton and on_gpu else "torch"
    if backend == "triton":
        ok, why = triton_can_run(device)
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run: {why}")
    return backend


def sinkhorn_knopp(
    logits: torch.Tensor,
    iters: int = 20,
    *,
    order: str = "col_row",
    eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """Project logits onto (near) doubly stochastic matrices with ``iters`` Sinkhorn-Knopp steps.

    Args:
        logits: ``(..., n, n)``, any leading batch shape, any strides; float32, float16, bfloat16
            (float64 is accepted and iterated in float64, for gradcheck).
        iters: number of (column, row) normalisation pairs, at least 1.
        order: ``"col_row"`` (paper Eq. 9: columns then rows; rows of the result sum to 1 exactly)
            or ``"row_col"`` (rows then columns; columns exact).
        eps: added to every normaliser; keeps rows or columns that underflow finite (they stay 0).
        backend: ``"auto"`` (Triton on CUDA tensors when installed, else PyTorch; the
            ``MHC_BACKEND`` environment variable overrides it), ``"torch"`` or ``"triton"``.

    Returns:
        ``(..., n, n)`` in the dtype of ``logits``; iterations run in float32. Masked entries
        (``-inf``) are 0; NaN or ``+inf`` in a matrix gives NaN in that matrix.

    Example:
        >>> p = sinkhorn_knopp(torch.randn(8, 4, 4), iters=20)
        >>> torch.allclose(p.sum(-1), torch.ones(8, 4))
        True
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape (..., n, n), got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have n >= 1")
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits dtype must be float32, float16 or bfloat16, got {logits.dtype}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if order not in ORDER_DIMS:
        raise ValueError(f"order must be one of {tuple(ORDER_DIMS)}, got {order!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if resolve_backend(backend, logits.device) == "triton":
        if logits.dtype == torch.float64:
            raise TypeError("backend='triton' takes float32, float16 or bfloat16, not float64")
        from .triton import sinkhorn_knopp_triton

        return sinkhorn_knopp_triton(logits, iters, order, float(eps))
    return sinkhorn_knopp_reference(logits, iters, order, float(eps))


__all__ = ["resolve_backend", "sinkhorn_knopp", "sinkhorn_knopp_reference", "triton_available"]
