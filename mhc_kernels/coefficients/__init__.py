"""Fused coefficient projection of an mHC layer: ``v @ phi`` and ``sum(v^2)`` in one read of v."""

from __future__ import annotations

import torch

from .._host import MAX_FUSED_STREAMS, SWEPT_COLUMNS
from ..sinkhorn import resolve_backend, sinkhorn_knopp
from .reference import epilogue_reference, projection_backward_reference, projection_reference

AUTO_MIN_FEATURES = 4096  # K = n*C from which ``auto`` takes the kernels (measured: 2048, 5952)


def triton_by_default(v: torch.Tensor, phi: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` runs the Triton projection (on CUDA): streams of at least
    ``AUTO_MIN_FEATURES`` features in float32/bf16/fp16, float32 ``phi`` of at most
    ``SWEPT_COLUMNS`` columns (n <= 4; wider W runs unswept tiles)."""
    K, W = phi.shape
    return (K >= AUTO_MIN_FEATURES and W <= SWEPT_COLUMNS and phi.dtype == torch.float32
            and v.dtype in (torch.float32, torch.bfloat16, torch.float16))  # fmt: skip


def projection(v: torch.Tensor, phi: torch.Tensor, backend: str = "auto"):
    """``v: (..., K)``, ``phi: (K, W)`` -> ``(v @ phi: (..., W), sum(v^2): (...))``.

    Triton reads the streams once for both (float32 ``phi`` only). Same ``backend`` rules as
    :func:`mhc_kernels.sinkhorn_knopp`, except that ``auto`` takes the kernels only where they were
    measured faster (:func:`triton_by_default`): on an H200 with the launches swept there, at n = 4
    and C = 1488 (K = 5,952), the mHC block replayed as CUDA graphs ran 3-4% faster with them
    (bf16 autocast, float32 streams), 9-10% with bf16 streams and 0.3% in float32; eager 15% and
    1% (benchmarks/README.md). At C = 512 (K = 2,048) the graphs were even but the eager block
    5-17% slower (more launches for the host): narrower streams stay on cuBLAS.

    Example:
        >>> proj, sumsq = projection(torch.ones(3, 8), torch.ones(8, 24))
        >>> proj.shape, sumsq.tolist()
        (torch.Size([3, 24]), [8.0, 8.0, 8.0])
    """
    if resolve_backend(backend, v.device, auto_triton=triton_by_default(v, phi)) == "triton":
        from .triton import projection_triton

        return projection_triton(v, phi)
    return projection_reference(v, phi)


def projection_backward(v: torch.Tensor, phi: torch.Tensor, dproj: torch.Tensor,
                        dsumsq: torch.Tensor | None = None, backend: str = "auto", *,
                        want_dv: bool = True, want_dphi: bool = True):  # fmt: skip
    """The gradients of :func:`projection` for the upstream ``(dproj, dsumsq)``: ``(dv, dphi)``
    as autograd would give them, each ``None`` unless wanted, without re-running the forward
    (recomputation and the fused connection backward call it; the latter wants ``dphi`` alone and
    writes ``dv`` with the streams' other gradients). ``dsumsq`` is read for ``dv`` only. Backends
    as for :func:`projection`; Triton reads v once for each gradient."""
    K, W = phi.shape
    if want_dv and dsumsq is None:
        raise ValueError("the gradient of v needs dsumsq")
    if resolve_backend(backend, v.device, auto_triton=triton_by_default(v, phi)) != "triton":
        return projection_backward_reference(v, phi, dproj, dsumsq, want_dv, want_dphi)
    from .triton import projection_dphi, projection_dv

    v2, dproj = v.reshape(-1, K).contiguous(), dproj.reshape(-1, W).float().contiguous()
    dv = dphi = None
    if want_dv:
        dss = dsumsq.reshape(-1).float().contiguous()
        dv = projection_dv(v2, phi.contiguous(), dproj, dss).reshape(v.shape)
    if want_dphi:
        dphi = projection_dphi(v2, dproj, phi)
    return dv, dphi


def epilogue(
    proj: torch.Tensor,
    sumsq: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    n: int,
    features: int,
    rms_eps: float,
    backend: str = "auto",
    sinkhorn: tuple[int, str, float] | None = None,
):
    """The coefficients from the projection: ``(H_pre (..., n), H_post (..., n), H_res (..., n, n))``
    with ``sinkhorn=(iters, order, eps)`` projecting H_res by :func:`mhc_kernels.sinkhorn_knopp`,
    or H_res's logits for ``sinkhorn=None``; :func:`epilogue_reference` has the formula.

    Triton does all of it, Sinkhorn included, in one kernel each way instead of about a dozen
    small PyTorch operations and a Sinkhorn kernel: on an H200 (n = 4, C = 1488, 4,096 and 16,384
    tokens) forward+backward 0.82-0.97 ms against 1.57-1.75 ms, the forward 0.15 ms against
    0.22-0.50 ms. ``auto`` takes it on CUDA for float32 inputs and ``n <= 8`` (what the compile
    check covers); otherwise it runs the PyTorch formula, and Sinkhorn follows its own ``backend``.

    Example:
        >>> pre, post, res = epilogue(torch.zeros(2, 8), torch.ones(2), torch.ones(3),
        ...                           torch.zeros(8), n=2, features=4, rms_eps=0.0)
        >>> pre.tolist(), post.tolist(), res.shape
        ([[0.5, 0.5], [0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]], torch.Size([2, 2, 2]))
    """
    fits = n <= MAX_FUSED_STREAMS and (
        proj.dtype == sumsq.dtype == alpha.dtype == bias.dtype == torch.float32
    )
    if resolve_backend(backend, proj.device, auto_triton=fits) == "triton":
        from .triton import epilogue_triton

        return epilogue_triton(proj, sumsq, alpha, bias, n, features, rms_eps, *(sinkhorn or ()))
    pre, post, res = epilogue_reference(proj, sumsq, alpha, bias, n, features, rms_eps)
    res = res.unflatten(-1, (n, n))
    if sinkhorn is not None:
        iters, order, eps = sinkhorn
        res = sinkhorn_knopp(res, iters, order=order, eps=eps, backend=backend)
    return pre, post, res


__all__ = ["epilogue", "epilogue_reference", "projection", "projection_backward",
           "projection_reference"]  # fmt: skip
