"""Fused stream-mixing kernels (pre-mix, post/residual merge) against the PyTorch reference."""

import pytest
import torch

from mhc_kernels.coefficients.triton import CANDIDATE_TILES
from mhc_kernels.streams import merge, pre_mix

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grads(fn, inputs, upstream):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out.double(), *(g.double() for g in torch.autograd.grad(out, inputs, upstream))]


def assert_close_to_reference(fn, inputs, upstream_shape, device, dtype, rounding=None):
    """Fused vs reference, both against the float64 reference: error within 4x the reference's
    (plus one rounding to ``rounding``, the lowest-precision dtype involved; default ``dtype``)."""
    upstream = torch.randn(upstream_shape, device=device).to(dtype)
    got = grads(lambda *t: fn(*t, backend="triton"), inputs, upstream)
    ref = grads(lambda *t: fn(*t, backend="torch"), inputs, upstream)
    exact = grads(lambda *t: fn(*t, backend="torch"),
                  [t.double() for t in inputs], upstream.double())  # fmt: skip
    floor = max(1e-6, torch.finfo(rounding or dtype).eps)  # one rounding of a low-precision output
    for name, g, r, e in zip(["out", *range(len(inputs))], got, ref, exact, strict=True):
        scale = e.abs().max().clamp_min(1e-30)
        bound = 4 * (r - e).abs().max() + floor * scale
        assert (g - e).abs().max() <= bound, f"{name}: {(g - e).abs().max():.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("C", [8, 72, 130], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8], ids=lambda n: f"n{n}")
def test_pre_mix_and_merge_match_the_reference(n, C, dtype, device):
    T = 37  # not a multiple of any block
    dt = DTYPES[dtype]
    x = torch.randn(T, n, C, device=device).to(dt)
    y = torch.randn(T, C, device=device).to(dt)
    h_pre, h_post = torch.rand(T, n, device=device), 2 * torch.rand(T, n, device=device)
    h_res = torch.rand(T, n, n, device=device)
    assert_close_to_reference(pre_mix, [x, h_pre], (T, C), device, dt)
    assert_close_to_reference(merge, [x, y, h_post, h_res], (T, n, C), device, dt)


@pytest.mark.parametrize("x_dtype,y_dtype", [("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "fp16")])
def test_merge_takes_the_branch_output_in_its_own_dtype(x_dtype, y_dtype, device):
    T, n, C = 37, 4, 72
    x = torch.randn(T, n, C, device=device).to(DTYPES[x_dtype])
    y = torch.randn(T, C, device=device).to(DTYPES[y_dtype])
    h_post, h_res = 2 * torch.rand(T, n, device=device), torch.rand(T, n, n, device=device)
    rounding = max((DTYPES[x_dtype], DTYPES[y_dtype]), key=lambda d: torch.finfo(d).eps)
    inputs = [x, y, h_post, h_res]
    assert_close_to_reference(merge, inputs, (T, n, C), device, DTYPES[x_dtype], rounding)
    # nothing but the inputs themselves is saved: no copy of y in the streams' dtype
    saved = []
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = merge(*leaves, backend="triton")
    assert {t.dtype for t in saved if t.dim() == 2 and t.shape[-1] == C} == {DTYPES[y_dtype]}
    (dy,) = torch.autograd.grad(out, leaves[1], torch.ones_like(out))
    assert dy.dtype == DTYPES[y_dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_streams_are_saved_as_they_are(backend, device):
    """bf16 streams and branch output: the pre-mix and the merge save the inputs themselves for
    backward, either backend (the PyTorch path once saved float32 copies: bf16 streams kept more
    bytes than float32 ones)."""
    T, n, C = 37, 4, 72
    x = torch.randn(T, n, C, device=device).to(torch.bfloat16)
    y = torch.randn(T, C, device=device).to(torch.bfloat16)
    h_pre, h_post = torch.rand(T, n, device=device), torch.rand(T, n, device=device)
    h_res = torch.rand(T, n, n, device=device)
    leaves = [t.detach().requires_grad_() for t in (x, y, h_pre, h_post, h_res)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pre_mix(leaves[0], leaves[2], backend=backend)
        merge(leaves[0], leaves[1], *leaves[3:], backend=backend)
    big = [t for t in saved if t.numel() >= T * C]
    assert big and all(t.dtype == torch.bfloat16 for t in big)


def test_reference_backwards_are_autograds():
    """The PyTorch pre-mix and merge with their backward written out: gradcheck and gradgradcheck
    in float64, coefficients broadcast over the leading dimensions included."""
    from mhc_kernels.streams import merge_reference, pre_mix_reference

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, y = leaf(2, 3, 4, 5), leaf(2, 3, 5)
    for h_pre in (leaf(2, 3, 4), leaf(4)):
        assert torch.autograd.gradcheck(pre_mix_reference, (x, h_pre))
        assert torch.autograd.gradgradcheck(pre_mix_reference, (x, h_pre))
    for h_post, h_res in ((leaf(2, 3, 4), leaf(2, 3, 4, 4)), (leaf(4), leaf(1, 4, 4))):
        assert torch.autograd.gradcheck(merge_reference, (x, y, h_post, h_res))
        assert torch.autograd.gradgradcheck(merge_reference, (x, y, h_post, h_res))


class _NoOpCasts(torch.overrides.TorchFunctionMode):
    """Records the results of ``Tensor.to`` calls that return their input unchanged."""

    def __init__(self):
        super().__init__()
        self.results = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to and out is args[0]:
            self.results.append(out)
        return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reference_outputs_are_not_no_op_casts(dtype):
    """torch 2.11 under torch.compile routes the gradient of a Function's output that is the same
    tensor as a forward intermediate to the wrong slot (pytorch/pytorch#180642): the reference
    Functions must not return one. The PyTorch pre-mix and merge returned ``result.to(x.dtype)``, which for float32 streams is ``result`` itself, and
    every gradient of a compiled mHC stack was wrong on the GPU machine's torch 2.11 (torch 2.13
    is fixed, so this checks the cause rather than the symptom)."""
    from mhc_kernels.coefficients import projection_reference
    from mhc_kernels.sinkhorn import sinkhorn_knopp_reference
    from mhc_kernels.streams import merge_reference, pre_mix_reference

    x = torch.randn(2, 4, 8).to(DTYPES[dtype]).requires_grad_()
    y = torch.randn(2, 8).to(DTYPES[dtype]).requires_grad_()
    h_pre, h_post, h_res = torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 4, 4)
    logits, phi = torch.randn(2, 4, 4, requires_grad=True), torch.randn(32, 24, requires_grad=True)
    with _NoOpCasts() as casts:
        outputs = [pre_mix_reference(x, h_pre), merge_reference(x, y, h_post, h_res),
                   *projection_reference(x.reshape(2, 32), phi),
                   sinkhorn_knopp_reference(logits.to(DTYPES[dtype]), iters=3)]  # fmt: skip
    assert not [o for o in outputs if any(o is r for r in casts.results)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("x_dtype,y_dtype", [("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")])
def test_merge_backward_alone_equals_autograd_through_merge(backend, x_dtype, y_dtype, device):
    """What recomputation calls instead of re-running the merge: the same gradients, bit for bit,
    in the inputs' dtypes and shapes (leading dimensions kept)."""
    from mhc_kernels.streams import merge_backward

    x = torch.randn(3, 7, 4, 24, device=device).to(DTYPES[x_dtype])
    y = torch.randn(3, 7, 24, device=device).to(DTYPES[y_dtype])
    h_post, h_res = torch.rand(3, 7, 4, device=device), torch.rand(3, 7, 4, 4, device=device)
    grad = torch.randn(3, 7, 4, 24, device=device).to(DTYPES[x_dtype])
    leaves = [t.detach().requires_grad_() for t in (x, y, h_post, h_res)]
    expected = torch.autograd.grad(merge(*leaves, backend=backend), leaves, grad)
    got = merge_backward(x, y, h_post, h_res, grad, backend)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_pre_mix_backward_alone_equals_autograd_through_pre_mix(backend, dtype, device):
    from mhc_kernels.streams import pre_mix_backward

    x = torch.randn(3, 7, 4, 24, device=device).to(DTYPES[dtype])
    h_pre = torch.rand(3, 7, 4, device=device)
    grad = torch.randn(3, 7, 24, device=device).to(DTYPES[dtype])
    leaves = [t.detach().requires_grad_() for t in (x, h_pre)]
    expected = torch.autograd.grad(pre_mix(*leaves, backend=backend), leaves, grad)
    for g, e in zip(pre_mix_backward(x, h_pre, grad, backend), expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_backwards_without_their_stream_gradient(backend, dtype, device):
    """``want_dx=False`` (the fused connection backward): no dx, the other gradients as before."""
    from mhc_kernels.streams import merge_backward, pre_mix_backward

    dt = DTYPES[dtype]
    x, y = torch.randn(3, 7, 4, 24, device=device).to(dt), torch.randn(3, 7, 24, device=device)
    h_pre, h_res = torch.rand(3, 7, 4, device=device), torch.rand(3, 7, 4, 4, device=device)
    g_in, g_out = torch.randn_like(y).to(dt), torch.randn_like(x)
    for full, lean in [
        (pre_mix_backward(x, h_pre, g_in, backend), pre_mix_backward(x, h_pre, g_in, backend, False)),
        (merge_backward(x, y.to(dt), h_pre, h_res, g_out, backend),
         merge_backward(x, y.to(dt), h_pre, h_res, g_out, backend, False)),
    ]:  # fmt: skip
        assert lean[0] is None
        for g, e in zip(lean[1:], full[1:], strict=True):  # PyTorch: contractions, not autograd
            assert g.dtype == e.dtype and g.shape == e.shape
            torch.testing.assert_close(
                g, e, **({} if backend == "torch" else {"rtol": 0, "atol": 0})
            )


MERGE_FORMS = [  # the merge backward's forms other than the shipped one: (flag, n, dtype)
    *[("stream_by_stream", n, dtype) for n in (1, 3, 4) for dtype in DTYPES],
    *[("tensor_cores", n, dtype) for n in (1, 2, 3, 4, 8) for dtype in ("bf16", "fp16")],
]


@pytest.mark.parametrize("form,n,dtype", MERGE_FORMS, ids=lambda v: str(v))
def test_merge_backwards_other_forms_match_the_reference(form, n, dtype, device, monkeypatch):
    """The merge backward's other forms: stream by stream (as it runs for n >
    LOADS_FIRST_STREAMS; for n <= 4 it ships loads first, every load before its first store) and
    on tensor cores (16-bit streams, ``MERGE_MMA``, not shipped): the reference's gradients
    within its bound, and without dx the other gradients bit for bit."""
    from mhc_kernels.streams import merge_backward
    from mhc_kernels.streams import triton as kernels

    if form == "stream_by_stream":
        monkeypatch.setattr(kernels, "MERGE_LOADS_FIRST", False)
    else:
        monkeypatch.setattr(kernels, "MERGE_MMA", True)
    T, C, dt = 37, 130, DTYPES[dtype]  # C: not a multiple of 8 (scalar loads, masked tail)
    x, y = torch.randn(T, n, C, device=device).to(dt), torch.randn(T, C, device=device).to(dt)
    assert kernels.merge_mma(x, y) == (form == "tensor_cores") and not kernels.merge_mma(
        x, y.float()
    )
    h_post, h_res = 2 * torch.rand(T, n, device=device), torch.rand(T, n, n, device=device)
    assert_close_to_reference(merge, [x, y, h_post, h_res], (T, n, C), device, dt)
    g = torch.randn(T, n, C, device=device).to(dt)
    full = merge_backward(x, y, h_post, h_res, g, "triton")
    lean = merge_backward(x, y, h_post, h_res, g, "triton", False)
    assert lean[0] is None
    for got, want in zip(lean[1:], full[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter's test (CPU tensors); on a GPU every kernel test runs these configurations",
)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_gpu_launch_configurations_give_the_interpreters_results(n, dtype, monkeypatch):
    """The interpreter runs few, large programs; a GPU runs the shipped configurations (from the
    H200 sweeps: pre-mix and merge forward a whole row of up to 2048 channels per token, the merge
    backward float32 a whole row and 16-bit 512-channel blocks, loads first, the stream gradient 4
    tokens and 64-512 channels, 4 rank-1 updates per step). The same
    kernels under those configurations, on CPU, match the interpreter's tiles to float32 rounding,
    the backwards' coefficient gradients summed over C blocks included."""
    from mhc_kernels.streams import merge_backward, pre_mix_backward, stream_grad
    from mhc_kernels.streams import triton as kernels

    T, C, W, dt = 20, 520, n * n + 2 * n, DTYPES[dtype]
    x, g_out = torch.randn(T, n, C).to(dt), torch.randn(T, n, C).to(dt)
    g_in, y = torch.randn(T, C).to(dt), torch.randn(T, C).to(dt)
    h_pre, h_post, h_res = torch.rand(T, n), torch.rand(T, n), torch.rand(T, n, n)
    dss, dproj, phi = torch.randn(T), torch.randn(T, W), torch.randn(n * C, W) / (n * C) ** 0.5

    def run():
        outs = [pre_mix(x, h_pre, "triton"), *pre_mix_backward(x, h_pre, g_in, "triton"),
                merge(x, y, h_post, h_res, "triton"),
                *merge_backward(x, y, h_post, h_res, g_out, "triton"),
                stream_grad(x, g_in, g_out, h_pre, h_res, dss, dproj, phi, "triton")]  # fmt: skip
        return [o.double() for o in outs]

    def check(got, want):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=4 * torch.finfo(dt).eps, atol=1e-5)

    interpreter = run()
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    gpu_tiles = kernels.stream_grad_config(T, n, C, x.element_size())
    assert gpu_tiles["BT"] < T and gpu_tiles["BC"] < C  # several programs each way
    check(run(), interpreter)
    # C in three blocks: the backwards' coefficient gradients summed over blocks, and the merge
    # backward's other form, stream by stream (n = 8's shipped one)
    itemsize = x.element_size()
    monkeypatch.setitem(kernels.GPU_BLOCKS, ("pre_mix_bwd", itemsize), (256, 4))
    monkeypatch.setitem(kernels.GPU_BLOCKS, ("merge_bwd", itemsize), (256, 2))
    monkeypatch.setattr(kernels, "MERGE_LOADS_FIRST", False)
    check(pre_mix_backward(x, h_pre, g_in, "triton"), interpreter[1:3])
    check(merge_backward(x, y, h_post, h_res, g_out, "triton"), interpreter[4:8])
    if dt != torch.float32:  # the merge backward on tensor cores: C in three blocks of 4 steps
        monkeypatch.setattr(kernels, "MERGE_MMA", True)
        monkeypatch.setattr(
            kernels, "GPU_MMA_MERGE", {**kernels.GPU_MMA_MERGE, "BC": 256, "BK": 64}
        )
        assert kernels.merge_mma_config(n, C)["BT"] < T
        check(merge_backward(x, y, h_post, h_res, g_out, "triton"), interpreter[4:8])


@pytest.mark.parametrize("per_step,stages", [(4, 1), (1, 1), (2, 3)],
                         ids=lambda k: f"{k}")  # fmt: skip
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("merge_grad", [True, False], ids=["merge", "no-merge"])
@pytest.mark.parametrize("n,C", [(1, 24), (3, 130), (4, 72), (8, 16)], ids=lambda v: str(v))
def test_stream_grad_matches_the_reference(n, C, merge_grad, dtype, per_step, stages, device,
                                           monkeypatch):  # fmt: skip
    """The connection's one-pass stream gradient against the float64 formula, and the formula
    against autograd's sum of the pre-mix's, merge's and projection's stream gradients. The
    kernel's projection term, W rank-1 updates, 4 per loop step (shipped; W = 3, 15, 24, 80:
    fewer than 4, and not a multiple of 4) or one, and 2 per step with the loop's loads copied
    2 steps ahead (``STAGES``: on a GPU; the interpreter runs the same loop)."""
    from mhc_kernels.coefficients import projection
    from mhc_kernels.streams import stream_grad
    from mhc_kernels.streams import triton as kernels

    monkeypatch.setattr(kernels, "STREAM_GRAD_UNROLL", per_step)
    monkeypatch.setattr(kernels, "STREAM_GRAD_STAGES", stages)

    T, W, dt = 37, n * n + 2 * n, DTYPES[dtype]
    x = torch.randn(T, n, C, device=device).to(dt)
    g_in, g_out = torch.randn(T, C, device=device).to(dt), torch.randn(T, n, C, device=device)
    g_out = g_out.to(dt) if merge_grad else None
    h_pre, h_res = torch.rand(T, n, device=device), torch.rand(T, n, n, device=device)
    dss, dproj = torch.randn(T, device=device), torch.randn(T, W, device=device)
    phi = torch.randn(n * C, W, device=device) / (n * C) ** 0.5

    def run(backend, dtype, phi_dtype=torch.float32):
        args = [t if t is None else t.to(dtype) for t in (x, g_in, g_out)]
        return stream_grad(*args, h_pre, h_res, dss, dproj, phi.to(phi_dtype), backend).double()

    got, ref = run("triton", dt), run("torch", dt)
    exact = run("torch", torch.float64, torch.float64)
    floor = max(1e-6, torch.finfo(dt).eps) * exact.abs().max()
    assert (got - exact).abs().max() <= 4 * (ref - exact).abs().max() + floor

    leaves = [t.double().requires_grad_() for t in (x, h_pre, h_res)]
    v = leaves[0].reshape(T, n * C)
    outs = [pre_mix(leaves[0], leaves[1], "torch"), *projection(v, phi.double(), "torch")]
    ups = [g_in.double(), dproj.double(), dss.double()]
    if merge_grad:
        outs.append(
            merge(
                leaves[0],
                torch.zeros(T, C, device=device).double(),
                h_pre.double(),
                leaves[2],
                "torch",
            )
        )
        ups.append(g_out.double())
    (autograd_dx,) = torch.autograd.grad(outs, leaves[0], ups)
    torch.testing.assert_close(exact, autograd_dx)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_projection_backward_matches_autograd_without_rerunning(backend, device):
    """``projection_backward`` gives autograd's gradients of ``projection`` (bf16 streams), each
    only when wanted: the fused connection backward asks for phi's alone."""
    from mhc_kernels.coefficients import projection, projection_backward

    v = torch.randn(3, 13, 4 * 72, device=device).to(torch.bfloat16).requires_grad_()
    phi = (0.1 * torch.randn(4 * 72, 24, device=device)).requires_grad_()
    dproj, dss = torch.randn(3, 13, 24, device=device), torch.randn(3, 13, device=device)
    expected = torch.autograd.grad(projection(v, phi, backend), (v, phi), (dproj, dss))
    dv, dphi = projection_backward(v.detach(), phi.detach(), dproj, dss, backend)
    assert dv.dtype == v.dtype and dphi.dtype == torch.float32
    for got, exp in zip((dv, dphi), expected, strict=True):
        torch.testing.assert_close(got, exp)
    exact = v.double().reshape(-1, 4 * 72).T @ dproj.double().reshape(-1, 24)
    torch.testing.assert_close(dphi.double(), exact, rtol=1e-5, atol=1e-5)
    only = projection_backward(v.detach(), phi.detach(), dproj, None, backend, want_dv=False)
    assert only[0] is None and torch.equal(only[1], dphi)
    only = projection_backward(v.detach(), phi.detach(), dproj, dss, backend, want_dphi=False)
    assert only[1] is None and torch.equal(only[0], dv)


def test_leading_shapes_and_dtypes(device):
    x = torch.randn(2, 3, 4, 16, device=device, dtype=torch.bfloat16)
    h = torch.rand(2, 3, 4, device=device)
    out = pre_mix(x, h, backend="triton")
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16
    merged = merge(x, out, h, torch.rand(2, 3, 4, 4, device=device), backend="triton")
    assert merged.shape == x.shape and merged.dtype == torch.bfloat16


def test_more_than_eight_streams(device):
    x, h = torch.randn(5, 9, 8, device=device), torch.rand(5, 9, device=device)
    with pytest.raises(ValueError, match="n <= 8"):
        pre_mix(x, h, backend="triton")
    torch.testing.assert_close(pre_mix(x, h), pre_mix(x, h, backend="torch"))


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
def test_layer_with_fused_kernels_matches_the_reference_layer(recompute, device):
    from mhc_kernels import MHCLayer

    torch.manual_seed(0)
    branch = torch.nn.Sequential(torch.nn.RMSNorm(32), torch.nn.Linear(32, 32)).to(device)
    fused = MHCLayer(branch, 32, 4, backend="triton", recompute=recompute).to(device)
    ref = MHCLayer(branch, 32, 4, backend="torch").to(device)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(3, 10, 4, 32, device=device, requires_grad=True)
    upstream = torch.randn(3, 10, 4, 32, device=device)
    out_f = fused(x)
    g_f = torch.autograd.grad(out_f, [x, *fused.parameters()], upstream)
    out_r = ref(x)
    g_r = torch.autograd.grad(out_r, [x, *ref.parameters()], upstream)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_projection_reference_backward_is_autograds():
    """The reference's written-out backward: gradcheck and gradgradcheck in float64 with leading
    dims; bf16 streams get a bf16 gradient equal to autograd through the plain expression; a
    frozen phi gets none."""
    from mhc_kernels.coefficients import projection_reference

    v = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(projection_reference, (v, phi))
    assert torch.autograd.gradgradcheck(projection_reference, (v, phi))

    vb = torch.randn(5, 64).to(torch.bfloat16).requires_grad_()
    phi = torch.randn(64, 24, requires_grad=True)
    up = torch.randn(5, 24), torch.randn(5)
    proj, ss = projection_reference(vb, phi)
    got = torch.autograd.grad((proj * up[0]).sum() + (ss * up[1]).sum(), (vb, phi))
    vf = vb.float()
    plain = (vf @ phi * up[0]).sum() + (vf.square().sum(-1) * up[1]).sum()
    want = torch.autograd.grad(plain, (vb, phi))
    assert got[0].dtype == torch.bfloat16
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    proj, ss = projection_reference(vb, phi.detach())
    (dv,) = torch.autograd.grad(proj.sum() + ss.sum(), vb)
    assert dv.shape == vb.shape


@pytest.mark.parametrize("dots", ["tensor-cores", "tensor-cores-parts", "fma"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,C", [(2, 8), (3, 24), (4, 72), (4, 1488), (8, 16)], ids=str)  # W = 15
def test_coefficient_projection_matches_the_reference(n, C, dtype, dots, device, monkeypatch):
    """Every way of the kernels' products: bf16 tensor cores with float32 operands split in three
    parts (shipped; the interpreter takes the parts in float32, the same products), the same with
    the float32 operand split once per call (``Tiles.parts``: phi for the forward and dv, dproj for
    dphi) and the forward's sum of squares from a second load (``Tiles.sumsq_apart``), float32
    FMAs."""
    from mhc_kernels.coefficients import projection
    from mhc_kernels.coefficients import triton as kernels

    monkeypatch.setattr(kernels, "TENSOR_CORES", dots != "fma")
    if dots == "tensor-cores-parts":
        form = {"parts": True, "sumsq_apart": True}
        parts = {key: tiles._replace(**form) for key, tiles in kernels.GPU_TILES.items()}
        monkeypatch.setattr(kernels, "GPU_TILES", parts)
        monkeypatch.setattr(
            kernels, "INTERPRETER_TILES", kernels.INTERPRETER_TILES._replace(**form)
        )

    T, W = 37, n * n + 2 * n
    v = torch.randn(T, n * C, device=device).to(DTYPES[dtype])
    phi = torch.randn(n * C, W, device=device) / (n * C) ** 0.5
    gen = torch.Generator(device=device).manual_seed(1)
    up_proj = torch.randn(T, W, device=device, generator=gen)
    up_ss = torch.randn(T, device=device, generator=gen)

    def run(backend, v, phi):
        v, phi = v.detach().requires_grad_(), phi.detach().requires_grad_()
        proj, ss = projection(v, phi, backend)
        grads = torch.autograd.grad((proj * up_proj.to(proj.dtype)).sum()
                                    + (ss * up_ss.to(ss.dtype)).sum(), (v, phi))  # fmt: skip
        return [t.double() for t in (proj, ss, *grads)]

    got, ref = run("triton", v, phi), run("torch", v, phi)
    exact = run("torch", v.double(), phi.double())
    # rounding of one fp32 sum of K = n*C terms in another order (~sqrt(K) ulps: a GPU's cuBLAS
    # reference and the kernel sum in different orders), or dv rounded to the stream dtype
    floor = max((n * C) ** 0.5 * 2**-24, torch.finfo(DTYPES[dtype]).eps)
    for name, g, r, e in zip(["proj", "sumsq", "dv", "dphi"], got, ref, exact, strict=True):
        bound = 4 * (r - e).abs().max() + floor * e.abs().max()
        assert (g - e).abs().max() <= bound, f"{name}: {(g - e).abs().max():.3g} > {bound:.3g}"


@pytest.mark.parametrize("n", [1, 4, 8])
def test_split_parts_splits_exactly(n, device):
    """``split_parts`` (phi, or dphi's dproj): three bf16 parts per entry that add up to the
    matrix exactly, each part within bf16's 8 bits of what the larger parts leave (rounded to
    nearest on a GPU, truncated by the interpreter: either split is exact), zero in the padded
    columns."""
    from mhc_kernels._split_dot import dot_width
    from mhc_kernels.coefficients.triton import split_parts

    K, W = 200, n * n + 2 * n  # K: several programs and a partial one
    gen = torch.Generator(device=device).manual_seed(3)
    phi = torch.randn(K, W, device=device, generator=gen) * torch.logspace(-20, 20, W, base=2.0,
                                                                          device=device)  # fmt: skip
    parts = split_parts(phi, dot_width(W))
    assert parts.shape == (3, K, dot_width(W)) and parts.dtype == torch.bfloat16
    assert not parts[:, :, W:].any()
    hi, mid, lo = parts[:, :, :W].double()
    whole = phi.double().abs()
    assert torch.equal(hi + mid + lo, phi.double())
    assert (mid.abs() <= 2**-7 * whole).all() and (lo.abs() <= 2**-14 * whole).all()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter's test (CPU tensors); on a GPU every kernel test runs these tiles",
)
@pytest.mark.parametrize("tiles", ["shipped", (64, 64, 4, 2, True), (32, 128, 8, 8, True),
                                   (64, 32, 4, 4, False), (32, 64, 4, 4, True, 3, True),
                                   (64, 32, 4, 8, True, 3, True, True)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_projections_gpu_tiles_give_the_interpreters_results(dtype, tiles, monkeypatch):
    """The interpreter runs wide K steps; a GPU runs ``GPU_TILES`` (and the sweep,
    benchmarks/sweep_projection.py, any other tiles and either form of the products through the
    same launchers). The same kernels with a GPU's tiles, on CPU, over several token blocks and K
    parts each way, match the interpreter's results to float32 rounding (dv: to its dtype's)."""
    from mhc_kernels.coefficients import triton as kernels

    T, n, C, dt = 300, 4, 40, DTYPES[dtype]
    K, W = n * C, n * n + 2 * n
    v, phi = torch.randn(T, K).to(dt), torch.randn(K, W) / K**0.5
    dproj, dss = torch.randn(T, W), torch.randn(T)

    def run():
        return [*kernels.projection_fwd(v, phi), kernels.projection_dv(v, phi, dproj, dss),
                kernels.projection_dphi(v, dproj, phi)]  # fmt: skip

    interpreter = run()
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    if tiles != "shipped":
        for key in (("fwd", dt.itemsize), ("dv", dt.itemsize), ("dphi", dt.itemsize)):
            monkeypatch.setitem(kernels.GPU_TILES, key, kernels.Tiles(*tiles))
    for kernel in ("fwd", "dv", "dphi"):  # several programs each way
        launched = kernels.projection_config(kernel, W, v.element_size())[1]
        assert launched.BT < T and launched.BK < K, (kernel, launched)
    for got, want in zip(run(), interpreter, strict=True):
        # float32 sums of up to max(T, K) terms in another order: ~sqrt(terms) ulps of the largest
        atol = 4 * max(T, K) ** 0.5 * 2**-24 * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=4 * torch.finfo(got.dtype).eps, atol=atol)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="a GPU's launches at the layer's sizes (the interpreter: the test above)",
)
@pytest.mark.parametrize("T", [1, 300, 4096, 5000], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("dtype,launch", [("fp32", "shipped"), ("bf16", "shipped"),
                                          *[("bf16", name) for name in CANDIDATE_TILES]])  # fmt: skip
def test_the_projections_gpu_launches_at_many_token_counts(T, dtype, launch, monkeypatch):
    """The shipped launches (``GPU_TILES``), and the candidates the sweeps time for them
    (``CANDIDATE_TILES``, for bf16), at n = 4, C = 1488 and token counts that split K into
    different numbers of parts: the forward, ``dv`` and ``dphi`` within 4x float32's own error against float64 plus
    the sweeps' bound (``dv``: one rounding to its dtype). On the H200 a race (the bf16 forward
    with phi's parts in 64-token tiles, its sum of squares reading v's tile: compile_check's
    ``in_flight_safe``) summed wrongly at some tiles and K parts only, so each launch is checked
    at several."""
    from mhc_kernels.coefficients import triton as kernels

    if launch != "shipped":  # not shipped: run natively before a sweep times it
        kernel, tiles = kernels.CANDIDATE_TILES[launch]
        monkeypatch.setitem(kernels.GPU_TILES, (kernel, 2), tiles)
    n, C, dt = 4, 1488, DTYPES[dtype]
    K, W = n * C, n * n + 2 * n
    gen = torch.Generator(device="cuda").manual_seed(5)
    v = torch.randn(T, K, device="cuda", generator=gen).to(dt)
    phi = torch.randn(K, W, device="cuda", generator=gen) / K**0.5
    dproj = torch.randn(T, W, device="cuda", generator=gen)
    dss = torch.randn(T, device="cuda", generator=gen)

    def formulas(v, phi, dproj, dss):
        return [v @ phi, (v * v).sum(1), dproj @ phi.T + 2 * v * dss[:, None], v.T @ dproj]

    got = [*kernels.projection_fwd(v, phi), kernels.projection_dv(v, phi, dproj, dss),
           kernels.projection_dphi(v, dproj, phi)]  # fmt: skip
    ref = formulas(v.float(), phi, dproj, dss)
    ref[2] = ref[2].to(dt)  # dv in the streams' dtype
    exact = formulas(v.double(), phi.double(), dproj.double(), dss.double())
    for name, g, r, e in zip(["proj", "sumsq", "dv", "dphi"], got, ref, exact, strict=True):
        # a float32 sum of K terms on tensor cores, whose additions do not round to nearest: up to
        # 4 sqrt(K) ulps (the sweeps' accuracy bound; with 1 sqrt(K), the H200's bf16 forward was
        # 2-25% over at 4,096 and 5,000 tokens), or dv rounded to its dtype
        floor = torch.finfo(dt).eps if name == "dv" else 4 * K**0.5 * 2**-24
        bound = 4 * (r.double() - e).abs().max() + floor * e.abs().max()
        error = (g.double() - e).abs().max()
        assert error <= bound, f"{name}: {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("sinkhorn", [None, (20, "col_row"), (7, "row_col")],
                         ids=["logits", "sinkhorn20", "sinkhorn7-row_col"])  # fmt: skip
@pytest.mark.parametrize("T", [37, 2100], ids=lambda t: f"T{t}")  # 2100: several programs
@pytest.mark.parametrize("n", [1, 2, 4, 8], ids=lambda n: f"n{n}")
def test_coefficient_epilogue_matches_the_reference(n, T, sinkhorn, device):
    """Gates and H_res (Sinkhorn fused in, or the logits) and every gradient against the float64
    reference (epilogue_reference, then sinkhorn_knopp)."""
    from mhc_kernels.coefficients import epilogue

    W, features = n * n + 2 * n, n * 96
    gen = torch.Generator(device=device).manual_seed(2)

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, device=device, generator=gen) * scale

    inputs = [draw(T, W, scale=3), (draw(T).abs() + 0.1) * features, draw(3), draw(W)]
    upstream = [draw(T, n), draw(T, n), draw(T, n, n)]
    options = None if sinkhorn is None else (*sinkhorn, 1e-12)

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        outs = epilogue(*leaves, n=n, features=features, rms_eps=1e-6, backend=backend,
                        sinkhorn=options)  # fmt: skip
        loss = sum((o * u.to(dtype)).sum() for o, u in zip(outs, upstream, strict=True))
        return [t.double() for t in (*outs, *torch.autograd.grad(loss, leaves))]

    got, ref, exact = (
        run("triton", torch.float32),
        run("torch", torch.float32),
        run("torch", torch.float64),
    )
    # the parameter gradients are sums over T tokens of terms that cancel: their fp32 rounding
    # scales with the sum of the terms' magnitudes, recovered from dproj = alpha * dz / r:
    # dalpha_k = sum dz q = sum dproj proj / alpha_k, dbias_w = sum dz = sum dproj r / alpha_k
    proj, dproj = inputs[0].double(), exact[3]
    r = (inputs[1].double() / features + 1e-6).sqrt()[:, None]
    alpha = inputs[2].double().abs().repeat_interleave(torch.tensor([n, n, n * n], device=device))
    magnitude = {"dalpha": torch.stack([t.sum() for t in (dproj * proj).abs().split([n, n, n * n], 1)])
                 / inputs[2].double().abs(), "dbias": (dproj.abs() * r).sum(0) / alpha}  # fmt: skip
    names = ["pre", "post", "res", "dproj", "dsumsq", "dalpha", "dbias"]
    for name, g, r, e in zip(names, got, ref, exact, strict=True):
        scale = magnitude.get(name, e.abs().max())
        bound = 4 * (r - e).abs().max() + T**0.5 * 2**-24 * scale + 1e-7
        worst = ((g - e).abs() - bound).max()
        assert worst <= 0, f"{name}: error exceeds its bound by {worst:.3g}"


@pytest.mark.parametrize(("n", "dtype", "fused"), [(4, torch.float32, True), (8, torch.float32, True),
                                                 (9, torch.float32, False), (4, torch.float64, False)])  # fmt: skip
def test_auto_takes_the_fused_epilogue_on_a_gpu_where_it_fits(n, dtype, fused, monkeypatch):
    """On CUDA ``auto`` runs the fused epilogue for float32 inputs and n <= 8 (faster on an H200,
    benchmarks/README.md) and the PyTorch formula otherwise; CPU stays on PyTorch."""
    import mhc_kernels.coefficients as coefficients
    import mhc_kernels.coefficients.triton as fused_kernels

    monkeypatch.delenv("MHC_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(fused_kernels, "epilogue_triton", lambda *a: calls.append(a) or (0, 0, 0))
    real = coefficients.resolve_backend
    as_on_a_gpu = lambda backend, device, **kw: real(backend, torch.device("cuda"), **kw)  # noqa: E731
    monkeypatch.setattr("mhc_kernels.sinkhorn.triton_available", lambda: True)
    W = n * n + 2 * n
    args = (torch.zeros(2, W, dtype=dtype), torch.ones(2, dtype=dtype), torch.ones(3, dtype=dtype),
            torch.zeros(W, dtype=dtype), n, n * 8, 1e-6)  # fmt: skip
    coefficients.epilogue(*args)
    assert not calls  # a CPU tensor: PyTorch
    monkeypatch.setattr(coefficients, "resolve_backend", as_on_a_gpu)
    coefficients.epilogue(*args)
    assert bool(calls) == fused


@pytest.mark.parametrize(("n", "C", "dtype", "fused"), [
    (4, 1488, torch.float32, True), (4, 1488, torch.bfloat16, True), (2, 2048, torch.float32, True),
    (4, 512, torch.float32, False), (5, 1488, torch.float32, False), (4, 1488, torch.float64, False)])  # fmt: skip
def test_auto_takes_the_triton_projection_for_wide_streams(n, C, dtype, fused, monkeypatch):
    """On CUDA ``auto`` runs the Triton projection, forward and backward, for n*C >= 4096 features
    and n <= 4 (measured faster there on an H200, benchmarks/README.md), cuBLAS otherwise; CPU
    stays on PyTorch."""
    import mhc_kernels.coefficients as coefficients
    import mhc_kernels.coefficients.triton as fused_kernels

    monkeypatch.delenv("MHC_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(fused_kernels, "projection_triton", lambda *a: calls.append("fwd") or a)
    monkeypatch.setattr(fused_kernels, "projection_dv", lambda *a: calls.append("dv") or a[0])
    monkeypatch.setattr(fused_kernels, "projection_dphi", lambda *a: calls.append("dphi") or a[2])
    real = coefficients.resolve_backend
    as_on_a_gpu = lambda backend, device, **kw: real(backend, torch.device("cuda"), **kw)  # noqa: E731
    monkeypatch.setattr("mhc_kernels.sinkhorn.triton_available", lambda: True)
    K, W = n * C, n * n + 2 * n
    v, phi = torch.zeros(2, K, dtype=dtype), torch.zeros(K, W, dtype=torch.float32)
    if dtype == torch.float64:
        phi = phi.double()
    dproj, dss = torch.zeros(2, W), torch.zeros(2)
    coefficients.projection(v, phi)
    coefficients.projection_backward(v, phi, dproj, dss)
    assert not calls  # CPU tensors: PyTorch
    monkeypatch.setattr(coefficients, "resolve_backend", as_on_a_gpu)
    coefficients.projection(v, phi)
    coefficients.projection_backward(v, phi, dproj, dss)
    assert calls == (["fwd", "dv", "dphi"] if fused else [])


def test_explicit_triton_refuses_float64_weights_for_the_fused_backward(device):
    """``backend="triton"`` never falls back silently: float64 phi (coeff_dtype=float64) is an
    error for the stream gradient and phi's gradient; ``torch`` computes them."""
    from mhc_kernels.coefficients import projection_backward
    from mhc_kernels.streams import stream_grad

    T, n, C, W = 4, 2, 8, 8
    x, dproj = torch.randn(T, n, C, device=device), torch.randn(T, W, device=device)
    args = [x, torch.randn(T, C, device=device), None, torch.rand(T, n, device=device),
            torch.rand(T, n, n, device=device), torch.randn(T, device=device), dproj]  # fmt: skip
    phi = torch.randn(n * C, W, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="float32 phi"):
        stream_grad(*args, phi, backend="triton")
    with pytest.raises(ValueError, match="float32 phi"):
        projection_backward(x.reshape(T, -1), phi, dproj, None, "triton", want_dv=False)
    assert stream_grad(*args, phi, backend="torch").dtype == torch.float32
    dphi = projection_backward(x.reshape(T, -1), phi, dproj, None, "torch", want_dv=False)[1]
    assert dphi.dtype == torch.float64
