"""Eager calls run the kernels through a plain Function; torch.compile sees the custom ops."""

import pytest
import torch

from mhc_kernels import sinkhorn_knopp
from mhc_kernels.coefficients import epilogue, projection
from mhc_kernels.streams import merge, pre_mix


def layer_like(x, phi, alpha, bias):
    """Every fused kernel, the way a connection chains them (Sinkhorn on its own and fused)."""
    n, C = x.shape[-2:]
    proj, ss = projection(x.flatten(-2), phi, "triton")
    h_pre, h_post, logits = epilogue(proj, ss, alpha, bias, n, n * C, 1e-6, "triton")
    _, _, fused = epilogue(proj, ss, alpha, bias, n, n * C, 1e-6, "triton", (3, "col_row", 1e-12))
    h_res = (sinkhorn_knopp(logits, 3, backend="triton") + fused) / 2
    y = pre_mix(x, h_pre, "triton") * ss[..., None].rsqrt()
    return merge(x, y, h_post, h_res, "triton")


def test_torch_compile_fullgraph_through_the_custom_ops_matches_eager(device):
    n, C = 4, 24
    x = torch.randn(6, n, C, device=device, requires_grad=True)
    phi = (torch.randn(n * C, n * n + 2 * n, device=device) / C).requires_grad_()
    alpha = torch.rand(3, device=device, requires_grad=True)
    bias = torch.randn(n * n + 2 * n, device=device, requires_grad=True)
    params = (x, phi, alpha, bias)
    upstream = torch.randn(6, n, C, device=device)
    compiled = torch.compile(layer_like, fullgraph=True, backend="aot_eager")
    out_c = compiled(*params)
    grads_c = torch.autograd.grad(out_c, params, upstream)
    out_e = layer_like(*params)
    grads_e = torch.autograd.grad(out_e, params, upstream)
    torch.testing.assert_close(out_c, out_e)
    for got, want in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(got, want)


def test_eager_calls_skip_the_custom_op_dispatch(device):
    x = torch.randn(5, 3, 3, device=device, requires_grad=True)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(sinkhorn_knopp(x, 2, backend="triton").sum(), x)
    names = {event.name for event in prof.events()}
    assert not any(name.startswith("mhc_kernels::") for name in names), sorted(names)


def test_without_grad_mode_the_launchers_run_without_a_function(device):
    """No graph to record: the kernel runs without ``Function.apply`` (its host cost is paid by
    the recomputed and fused connections, whose Functions call the kernels with grad mode off,
    and by no_grad callers), with the same result."""
    x = torch.randn(5, 3, 3, device=device, requires_grad=True)
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            out = sinkhorn_knopp(x, 2, backend="triton")
    assert not [e.name for e in prof.events() if e.name.startswith("Eager_")]
    assert out.grad_fn is None
    recorded = sinkhorn_knopp(x, 2, backend="triton")
    assert recorded.grad_fn is not None
    torch.testing.assert_close(out, recorded.detach(), rtol=0, atol=0)


def test_gradients_of_kernel_gradients_raise_instead_of_vanishing(device):
    x = torch.randn(5, 4, 8, device=device, requires_grad=True)
    y = torch.randn(5, 8, device=device, requires_grad=True)
    h_post, h_res = torch.rand(5, 4, device=device), torch.rand(5, 4, 4, device=device)
    out = merge(x, y, h_post, h_res, "triton")
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gx.square().sum() + y.sum()).backward()
