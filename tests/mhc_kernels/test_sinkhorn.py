"""The PyTorch reference (the specification) and the backend dispatch."""

import subprocess
import sys

import pytest
import torch

from mhc_kernels import sinkhorn_knopp
from mhc_kernels.sinkhorn import resolve_backend


def naive_sinkhorn(x, iters, order="col_row", eps=1e-12):
    """Ground truth: autograd straight through the loop (stores every iterate)."""
    dims = (-2, -1) if order == "col_row" else (-1, -2)
    shift = x.detach().amax(dim=dims[0], keepdim=True)
    a = torch.exp(x - shift)
    for _ in range(iters):
        for d in dims:
            a = a / (a.sum(dim=d, keepdim=True) + eps)
    return a


def ref(x, iters=20, **kw):
    return sinkhorn_knopp(x, iters, backend="torch", **kw)


@pytest.mark.parametrize("order,exact_dim", [("col_row", -1), ("row_col", -2)])
def test_second_axis_is_exact(order, exact_dim):
    p = ref(torch.randn(64, 5, 5) * 4, order=order)
    torch.testing.assert_close(p.sum(exact_dim), torch.ones(64, 5), atol=1e-6, rtol=0)
    assert (p >= 0).all()


@pytest.mark.parametrize("order", ["col_row", "row_col"])
def test_marginals_converge_for_well_conditioned_logits(order):
    p = ref(torch.randn(32, 4, 4, dtype=torch.float64) * 0.5, iters=200, order=order)
    ones = torch.ones(32, 4, dtype=torch.float64)
    torch.testing.assert_close(p.sum(-1), ones, atol=1e-10, rtol=0)
    torch.testing.assert_close(p.sum(-2), ones, atol=1e-10, rtol=0)


def test_twenty_iterations_leave_the_documented_column_gap():
    # FACTS.md §1: max |col sum - 1| after 20 iterations is ~1.7e-3 at sigma 1 and larger above;
    # the reference runs the truncated recurrence, not the converged projection.
    gen = torch.Generator().manual_seed(0)
    gap1 = (ref(torch.randn(4096, 4, 4, generator=gen)).sum(-2) - 1).abs().max()
    gap4 = (ref(4 * torch.randn(4096, 4, 4, generator=gen)).sum(-2) - 1).abs().max()
    assert 1e-4 < gap1 < 1e-2 and gap4 > gap1


@pytest.mark.parametrize("order", ["col_row", "row_col"])
def test_permutation_equivariance(order):
    x = torch.randn(16, 6, 6, dtype=torch.float64) * 3
    rows, cols = torch.randperm(6), torch.randperm(6)
    permuted = ref(x[:, rows][:, :, cols], order=order)
    torch.testing.assert_close(permuted, ref(x, order=order)[:, rows][:, :, cols])


@pytest.mark.parametrize("order", ["col_row", "row_col"])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_gradcheck_float64(order, iters):
    x = (torch.randn(3, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ref(t, iters, order=order), (x,))


@pytest.mark.parametrize("order", ["col_row", "row_col"])
@pytest.mark.parametrize("n,iters", [(1, 1), (2, 3), (4, 20), (7, 5), (16, 20)])
def test_recompute_backward_equals_naive_autograd(n, iters, order):
    x = (torch.randn(50, n, n, dtype=torch.float64) * 3).requires_grad_()
    grad = torch.randn(50, n, n, dtype=torch.float64)
    out = ref(x, iters, order=order)
    (dx,) = torch.autograd.grad(out, x, grad)
    expected = naive_sinkhorn(x, iters, order)
    (dx_naive,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dx, dx_naive, rtol=1e-10, atol=1e-12)


def test_all_ones_upstream_gradient_gives_zero_gradient():
    # rows sum to 1 exactly, so sum(P) == n whatever the logits: the true gradient is zero,
    # which is why every other gradient test uses a random upstream gradient (FACTS.md §2).
    x = torch.randn(8, 4, 4, dtype=torch.float64).requires_grad_()
    ref(x).sum().backward()
    assert x.grad.abs().max() < 1e-10


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 4, 4), (1, 1, 1, 3, 3)])
def test_any_leading_batch_shape(shape):
    x = torch.randn(shape)
    flat = ref(x.reshape(-1, shape[-1], shape[-1]))
    torch.testing.assert_close(ref(x), flat.reshape(shape))


def test_non_contiguous_input():
    base = torch.randn(4, 4, 10)
    x = base.transpose(0, 2)[:, :, :].transpose(1, 2)[::2]  # (5, 4, 4), strided
    assert not x.is_contiguous()
    torch.testing.assert_close(ref(x), ref(x.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_iterates_in_float32(dtype):
    x = torch.randn(64, 4, 4).to(dtype)
    out = ref(x)
    assert out.dtype == dtype
    exact = ref(x.double()).to(dtype)
    torch.testing.assert_close(out, exact, rtol=0, atol=torch.finfo(dtype).eps)


def test_extreme_logits_stay_finite_and_non_negative():
    x = (torch.rand(256, 4, 4) * 2 - 1) * 1e4  # spans +-1e4: most entries underflow
    x.requires_grad_()
    p = ref(x)
    assert torch.isfinite(p).all() and (p >= 0).all()
    rows = p.sum(-1)
    assert ((rows - 1).abs() < 1e-5).logical_or(rows == 0).all()  # exact, or an underflowed row
    (dx,) = torch.autograd.grad(p, x, torch.randn_like(p))
    assert torch.isfinite(dx).all()


def test_rows_that_underflow_stay_zero():
    x = torch.zeros(1, 3, 3)
    x[0, 2] = -1e4  # row 2 underflows in every column
    p = ref(x)
    torch.testing.assert_close(p[0, 2], torch.zeros(3))
    torch.testing.assert_close(p[0, :2].sum(-1), torch.ones(2))


def test_masked_entries_are_structural_zeros():
    x = torch.randn(10, 4, 4, dtype=torch.float64)
    mask = torch.rand(10, 4, 4) < 0.3
    mask[:, 0, :] = True  # a fully masked row
    x = x.masked_fill(mask, float("-inf")).requires_grad_()
    p = ref(x)
    assert torch.isfinite(p).all()
    assert (p[mask] == 0).all()
    (dx,) = torch.autograd.grad(p, x, torch.randn_like(p))
    assert torch.isfinite(dx).all() and (dx[mask] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_gives_nan_in_that_matrix_only(bad):
    x = torch.randn(3, 4, 4)
    x[1, 2, 3] = bad
    p = ref(x)
    assert torch.isnan(p[1]).all()
    assert torch.isfinite(p[[0, 2]]).all()


@pytest.mark.parametrize("iters", [0, -1, 2.0, True])
def test_iters_must_be_a_positive_integer(iters):
    with pytest.raises(ValueError, match="iters"):
        ref(torch.randn(4, 4), iters)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"logits": torch.randn(4, 3)}, ValueError, r"\(\.\.\., n, n\)"),
        ({"logits": torch.randn(4)}, ValueError, r"\(\.\.\., n, n\)"),
        ({"logits": torch.zeros(4, 4, dtype=torch.int64)}, TypeError, "dtype"),
        ({"order": "rows"}, ValueError, "order"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"eps": -1.0}, ValueError, "eps"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, error, match):
    args = {"logits": torch.randn(2, 4, 4), **kwargs}
    with pytest.raises(error, match=match):
        sinkhorn_knopp(args.pop("logits"), **args)


def test_auto_backend_is_the_reference_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("MHC_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv("MHC_BACKEND", "fast")
    with pytest.raises(ValueError, match="MHC_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))


def test_triton_where_it_cannot_run_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need a CUDA tensor"):
        sinkhorn_knopp(torch.randn(4, 4), backend="triton")


def test_auto_without_triton_uses_the_reference(monkeypatch):
    import mhc_kernels.sinkhorn as sk

    monkeypatch.setattr(sk, "triton_available", lambda: False)
    assert sk.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_opt_in_kernels_run_only_when_asked_for(monkeypatch):
    import mhc_kernels.sinkhorn as sk

    monkeypatch.setattr(sk, "triton_available", lambda: True)
    monkeypatch.delenv("MHC_BACKEND", raising=False)
    gpu = torch.device("cuda")
    assert sk.resolve_backend("auto", gpu) == "triton"
    assert sk.resolve_backend("auto", gpu, auto_triton=False) == "torch"
    monkeypatch.setenv("MHC_BACKEND", "triton")
    assert sk.resolve_backend("auto", gpu, auto_triton=False) == "triton"


def test_package_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mhc_kernels\n"
        "p = mhc_kernels.sinkhorn_knopp(torch.randn(2, 4, 4))\n"
        "assert torch.isfinite(p).all()\n"
        "try:\n"
        "    mhc_kernels.sinkhorn_knopp(torch.randn(2, 4, 4), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_torch_compile_without_graph_breaks():
    x = (torch.randn(32, 4, 4) * 2).requires_grad_()
    grad = torch.randn(32, 4, 4)
    compiled = torch.compile(lambda t: ref(t), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    expected = ref(x)
    (dx_eager,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dx, dx_eager)
