"""Sinkhorn-Knopp in plain PyTorch: the specification and the CPU path.

Forward (paper Eq. 9, ``order="col_row"``), per matrix ``X`` of shape ``(n, n)``::

    K   = exp(X - colmax(X))                 # shift along the axis normalised first
    A   = K
    repeat iters times:
        A = A / (colsum(A) + eps)            # columns (as A * reciprocal(...))
        A = A / (rowsum(A) + eps)            # rows: exact in the result
    P   = A

``order="row_col"`` swaps the two axes everywhere (the design document's variant: columns exact).

Why the shift is taken along the first-normalised axis: the first normalisation removes any
per-column factor exactly, so the shift changes nothing (up to ``eps``), and every first normaliser is
at least 1, so the first division can never be 0/0. Entries of ``-inf`` (masked positions) become
structural zeros; a fully masked row or column stays zero in the output. A row that underflows to
zero everywhere stays zero (its sum is ``eps``), so the output is finite and non-negative for every
input without NaN or ``+inf``. NaN or ``+inf`` anywhere in a matrix gives NaN in that matrix.
The shift is a constant for differentiation (the output does not depend on it).

Backward, exact for the ``iters`` unrolled steps. Each half-step is ``B = A / s`` with
``s = sum(A) + eps`` along one axis. Writing ``H = dL/dA * A`` (elementwise), the adjoint of a
half-step is division-free::

    H_A = H_B - B * sum(H_B)                 # sum along the step's axis

and ``dL/dX = H`` after walking back to ``K``, starting from ``H = G * P``. Walking back needs each
earlier ``B``; it is rebuilt as ``A = B * s`` from the ``2 * iters`` saved normaliser vectors
(``2 * iters * n`` floats per matrix), which the backward recomputes in one forward pass instead of
keeping every iterate alive between forward and backward (autograd would keep ``2 * iters``
matrices). Only the input is saved for backward.
"""

from __future__ import annotations

import functools

import torch

# The axis pair (first, second) each order normalises, for matrices stored as (..., rows, cols):
# summing over dim -2 gives column sums, over dim -1 row sums.
ORDER_DIMS = {"col_row": (-2, -1), "row_col": (-1, -2)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Iterations run in float32, or float64 for float64 input (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is. For the output of an autograd
    Function's forward: ``t.to(t.dtype)`` returns ``t`` itself, and under torch.compile torch 2.11
    routes the gradient of an output that is the same tensor as a forward intermediate to the wrong
    slot (pytorch/pytorch#180642, fixed in 2.12): wrong gradients, silently."""
    return t if t.dtype == dtype else t.to(dtype)


def autocast_exempt(fn):
    """Run a reference op with autocast off on its first argument's device.

    A reference's dtypes are its contract (sums in float32 for bf16 streams, coefficients in
    float32, FACTS.md section 1), but autocast runs matmuls, ``einsum`` included, in bf16: the
    projection and the stream sums would silently lose precision under a mixed-precision trainer.
    Autocast is left alone when it is off (the check is the only cost).
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        device = args[0].device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def to_batch_last(x: torch.Tensor) -> torch.Tensor:
    """``(..., n, n) -> (n, n, ...)`` contiguous: every sum over a matrix axis becomes a sum of
    contiguous batch vectors, several times faster on CPU than reducing a trailing axis of size n."""
    return x.movedim((-2, -1), (0, 1)).contiguous()


def from_batch_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim((0, 1), (-2, -1))


def kernel_matrix(x: torch.Tensor, first_dim: int) -> torch.Tensor:
    """``exp(x - max)`` with the max taken along ``first_dim``; fully ``-inf`` lines give zeros."""
    shift = x.amax(dim=first_dim, keepdim=True)
    shift = torch.where(shift == float("-inf"), torch.zeros_like(shift), shift)
    return torch.exp(x - shift)


def sinkhorn_forward(
    x: torch.Tensor, iters: int, dims: tuple[int, int], eps: float, normalisers: list | None = None
) -> torch.Tensor:
    """Run the iterations on ``x`` (in the compute dtype, any layout; ``dims`` are the matrix axes
    in the order they are normalised); optionally record the normalisers."""
    a = kernel_matrix(x, dims[0])
    for _ in range(iters):
        for dim in dims:
            s = a.sum(dim=dim, keepdim=True) + eps
            a = a * s.reciprocal()  # n reciprocals and n^2 products: ~2x faster than n^2 divisions
            if normalisers is not None:
                normalisers.append(s)
    return a


def sinkhorn_backward(
    x: torch.Tensor, grad: torch.Tensor, iters: int, dims: tuple[int, int], eps: float
) -> torch.Tensor:
    """Exact gradient of the unrolled iterations by one recomputation (see the module docstring)."""
    normalisers: list[torch.Tensor] = []
    b = sinkhorn_forward(x, iters, dims, eps, normalisers)
    h = grad * b
    for step in reversed(range(2 * iters)):
        dim = dims[step % 2]
        h = h - b * h.sum(dim=dim, keepdim=True)
        b = b * normalisers[step]
    return h


def batch_last_dims(order: str) -> tuple[int, int]:
    """``ORDER_DIMS`` for the ``(n, n, ...)`` layout: rows are dim 0, columns dim 1."""
    return tuple(d + 2 for d in ORDER_DIMS[order])


class SinkhornRecompute(torch.autograd.Function):
    """Autograd wrapper that saves only the logits and recomputes in backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, order: str, eps: float) -> torch.Tensor:
        dims = batch_last_dims(order)
        x = to_batch_last(logits.to(compute_dtype(logits.dtype)))
        out = from_batch_last(sinkhorn_forward(x, iters, dims, eps))
        ctx.save_for_backward(logits)
        ctx.config = (iters, dims, eps)
        # a fresh tensor (``.to`` with an unchanged dtype returns its input): under torch.compile,
        # torch 2.11 can route the gradient of an output that is the same tensor as a forward
        # intermediate to the wrong slot, giving zero gradients (pytorch/pytorch#180642, fixed in
        # 2.12). The copy is one pass over P against 2 * iters passes for the iterations.
        return out.to(logits.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        iters, dims, eps = ctx.config
        cdtype = compute_dtype(logits.dtype)
        x, g = to_batch_last(logits.to(cdtype)), to_batch_last(grad.to(cdtype))
        dx = from_batch_last(sinkhorn_backward(x, g, iters, dims, eps))
        return dx.to(logits.dtype), None, None, None


def sinkhorn_knopp_reference(
    logits: torch.Tensor, iters: int = 20, order: str = "col_row", eps: float = 1e-12
) -> torch.Tensor:
    """Reference Sinkhorn-Knopp; arguments as :func:`mhc_kernels.sinkhorn_knopp` (validated there)."""
    return SinkhornRecompute.apply(logits, iters, order, eps)
