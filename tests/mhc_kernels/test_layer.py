"""MHCLayer against a naive implementation of paper Eq. 7-9, initialisation, gradients, dtypes."""

import copy
import warnings

import pytest
import torch
from torch import nn

from mhc_kernels import MHCConfig, MHCLayer, collapse_streams, expand_streams, sinkhorn_knopp


class Block(nn.Module):
    """A pretrained-like residual branch: RMSNorm -> MLP (no skip connection)."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.RMSNorm(c)
        self.up = nn.Linear(c, 2 * c)
        self.down = nn.Linear(2 * c, c)

    def forward(self, x, scale=1.0):
        return scale * self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def naive_mhc(layer, x):
    """Eq. 7-9 written out with einsum, independently of MHCLayer.forward."""
    n, c = layer.n_streams, layer.dim
    v = x.reshape(*x.shape[:-2], n * c).double()
    r = v.pow(2).mean(-1, keepdim=True).add(layer.config.rms_eps).sqrt()
    phi, b, a = layer.phi.double(), layer.bias.double(), layer.alpha.double()
    dyn = torch.einsum("...k,kw->...w", v, phi) / r
    pre = torch.sigmoid(a[0] * dyn[..., :n] + b[:n])
    post = 2 * torch.sigmoid(a[1] * dyn[..., n : 2 * n] + b[n : 2 * n])
    res_logits = (a[2] * dyn[..., 2 * n :] + b[2 * n :]).unflatten(-1, (n, n))
    if layer.config.constraint == "sinkhorn":
        res = sinkhorn_knopp(res_logits, layer.config.sinkhorn_iters, backend="torch")
    else:
        res = res_logits
    xd = x.double()
    y = layer.branch(torch.einsum("...j,...jc->...c", pre, xd).to(x.dtype)).double()
    return torch.einsum("...ij,...jc->...ic", res, xd) + post[..., :, None] * y[..., None, :]


def coefficient_params(layer):
    return {"phi": layer.phi, "bias": layer.bias, "alpha": layer.alpha}


def make(c=16, n=4, **kw):
    torch.manual_seed(0)
    return MHCLayer(Block(c).double(), dim=c, n_streams=n, coeff_dtype=torch.float64, **kw)


@pytest.mark.parametrize("constraint", ["sinkhorn", "none"])
@pytest.mark.parametrize("init", ["identity", "paper"])
def test_matches_naive_einsum_outputs_and_gradients(init, constraint):
    layer = make(init=init, constraint=constraint)
    with torch.no_grad():  # move away from the initial point so every term matters
        layer.alpha.uniform_(0.2, 1.0)
        layer.bias.add_(torch.randn_like(layer.bias))
    x = torch.randn(3, 5, 4, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 4, 16, dtype=torch.float64)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(layer(x), params, grad)
    want_out = naive_mhc(layer, x)
    want = torch.autograd.grad(want_out, params, grad)
    torch.testing.assert_close(layer(x), want_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_identity_init_reproduces_the_plain_residual(n):
    torch.manual_seed(0)
    block = Block(32)
    layer = MHCLayer(copy.deepcopy(block), dim=32, n_streams=n)
    x = torch.randn(2, 7, 32)
    out = layer(expand_streams(x, n))
    want = x + block(x)
    for i in range(n):
        torch.testing.assert_close(out[..., i, :], want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(collapse_streams(out), want, rtol=2e-6, atol=2e-6)


def test_identity_init_h_res_is_doubly_stochastic_near_identity_with_live_jacobian():
    layer = make(n=4)
    x = expand_streams(torch.randn(5, 16, dtype=torch.float64), 4)
    h_pre, h_post, h_res = layer.coefficients(x)
    torch.testing.assert_close(h_pre.sum(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(h_post, torch.ones(5, 4, dtype=torch.float64))
    torch.testing.assert_close(h_res.diagonal(dim1=-2, dim2=-1), torch.full((5, 4), 0.9).double())
    torch.testing.assert_close(h_res.sum(-2), torch.ones(5, 4, dtype=torch.float64))


def test_no_dead_parameters_with_different_streams():
    layer = make(n=4)
    x = torch.randn(3, 6, 4, 16, dtype=torch.float64)
    loss = (layer(x) * torch.randn(3, 6, 4, 16, dtype=torch.float64)).sum()
    loss.backward()
    n = 4
    grads = {
        "phi_pre": layer.phi.grad[:, :n],
        "phi_post": layer.phi.grad[:, n : 2 * n],
        "phi_res": layer.phi.grad[:, 2 * n :],
        "b_pre": layer.bias.grad[:n],
        "b_post": layer.bias.grad[n : 2 * n],
        "b_res": layer.bias.grad[2 * n :],
    }
    for i, name in enumerate(["alpha_pre", "alpha_post", "alpha_res"]):
        grads[name] = layer.alpha.grad[i]
    for name, g in grads.items():
        assert g.abs().max() > 1e-8, f"{name} received no gradient"
    for name, p in layer.branch.named_parameters():
        assert p.grad.abs().max() > 0, name


def test_identical_streams_separate_after_one_step_then_every_parameter_learns():
    # first step from expand_streams: H_res cannot get gradient (module docstring); one update of
    # H_post separates the streams, and the second backward reaches every coefficient parameter.
    torch.manual_seed(0)
    layers = nn.ModuleList(MHCLayer(Block(16), dim=16, n_streams=4) for _ in range(2))
    opt = torch.optim.SGD(layers.parameters(), lr=0.1)
    x = torch.randn(4, 6, 16)
    target = torch.randn(4, 6, 16)

    def step():
        opt.zero_grad()
        h = expand_streams(x, 4)
        for layer in layers:
            h = layer(h)
        loss = (collapse_streams(h) - target).pow(2).mean()
        loss.backward()

    step()
    assert layers[0].bias.grad[:8].abs().min() > 0  # pre and post biases learn at once
    opt.step()
    step()
    for i, layer in enumerate(layers):
        for name, p in coefficient_params(layer).items():
            assert (p.grad != 0).any(), f"layer {i} {name}"
        assert layer.alpha.grad.abs().min() > 0, f"layer {i} alpha"
        assert layer.phi.grad[:, 8:].abs().max() > 0, f"layer {i} phi_res"


def test_h_res_mixes_genuinely_different_streams():
    layer = make(n=4)
    with torch.no_grad():
        layer.bias[8:] = torch.randn(16, dtype=torch.float64)  # a non-trivial H_res
        layer.branch.down.weight.zero_()
        layer.branch.down.bias.zero_()  # F = 0: the output is H_res x alone
    x = torch.randn(5, 4, 16, dtype=torch.float64)
    _, _, h_res = layer.coefficients(x)
    torch.testing.assert_close(layer(x), h_res @ x)
    assert not torch.allclose(layer(x), x)


def test_n1_is_a_gated_plain_residual():
    torch.manual_seed(0)
    block = Block(8)
    layer = MHCLayer(block, dim=8, n_streams=1)
    x = torch.randn(3, 1, 8)
    h_pre, h_post, h_res = layer.coefficients(x)
    torch.testing.assert_close(h_res, torch.ones(3, 1, 1))
    want = x + h_post[..., None] * block(h_pre[..., None] * x)
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams_keep_a_float32_coefficient_path(dtype):
    torch.manual_seed(0)
    block = Block(32)
    layer = MHCLayer(copy.deepcopy(block).to(dtype), dim=32, n_streams=4)
    x = torch.randn(4, 8, 4, 32)
    out = layer(x.to(dtype))
    assert out.dtype == dtype and layer.phi.dtype == torch.float32
    ref = MHCLayer(block, dim=32, n_streams=4)
    ref.load_state_dict(layer.state_dict(), strict=False)
    ref.branch.load_state_dict({k: v.float() for k, v in layer.branch.state_dict().items()})
    torch.testing.assert_close(out.float(), ref(x), rtol=0.05, atol=0.05)
    out.float().pow(2).sum().backward()
    assert torch.isfinite(layer.phi.grad).all() and layer.phi.grad.abs().max() > 0


def test_autocast_leaves_the_coefficients_and_stream_sums_in_float32():
    """A bf16 mixed-precision trainer runs the branch in bf16; the projection and the stream
    mixing (matmul and einsum, which autocast would lower to bf16) stay float32 (FACTS.md §1)."""
    torch.manual_seed(0)
    layer = MHCLayer(nn.Identity(), dim=32, n_streams=4, backend="torch")
    x = torch.randn(4, 8, 4, 32)
    expected = layer.coefficients(x), layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.coefficients(x), layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 8), (1, 4, 8), (2, 3, 5, 4, 8)], ids=str)
def test_odd_shapes(shape):
    layer = MHCLayer(Block(8), dim=8, n_streams=4)
    assert layer(torch.randn(shape)).shape == shape


def test_extra_arguments_reach_the_branch():
    layer = make(n=2)
    x = expand_streams(torch.randn(3, 16, dtype=torch.float64), 2)
    with torch.no_grad():
        plain = layer(x) - x
        scaled = layer(x, scale=2.0) - x
    torch.testing.assert_close(scaled, 2 * plain)


def test_wrong_stream_shape_names_the_fix():
    layer = MHCLayer(Block(8), dim=8, n_streams=4)
    with pytest.raises(ValueError, match="expand_streams"):
        layer(torch.randn(2, 8))


def test_a_branch_that_changes_the_shape_is_an_error():
    """The branch's output is added to the streams: a wrong shape is named, not reshaped."""
    layer = MHCLayer(nn.Linear(8, 16), dim=8, n_streams=4)
    with pytest.raises(ValueError, match=r"input's shape \(2, 3, 8\), got \(2, 3, 16\)"):
        layer(torch.randn(2, 3, 4, 8))


def test_the_kernels_layout_is_made_once_per_connection(monkeypatch):
    """Tokens become rows once per connection, not in every front door (a view and an autograd
    node each way on the host of a launch-bound step): the pre-mix and the merge get (T, n, C)
    streams and (T, C) branch outputs; `rows`/`shaped` hand back a tensor already shaped so."""
    import mhc_kernels.layer as layer_module
    from mhc_kernels._host import rows, shaped

    seen = []
    for name in ("pre_mix", "merge"):
        real = getattr(layer_module, name)
        spy = lambda *a, real=real: seen.append([t.dim() for t in a[:2]]) or real(*a)  # noqa: E731
        monkeypatch.setattr(layer_module, name, spy)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    layer = MHCLayer(Block(8), dim=8, n_streams=4)
    out = layer(x)
    assert out.shape == x.shape and seen == [[3, 2], [3, 2]]
    shapes = []
    y = layer.run_branch_on_rows(lambda t: shapes.append(t.shape) or 2 * t, torch.ones(6, 8), x)
    assert shapes == [(2, 3, 8)] and y.shape == (6, 8)
    t = torch.randn(6, 4, 8, requires_grad=True)
    assert rows(t, 4, 8) is t and shaped(t, (6, 4, 8)) is t
    assert rows(t, 32).shape == (6, 32) and shaped(t, (2, 3, 4, 8)).shape == (2, 3, 4, 8)
    s = t.sum((1, 2))
    assert rows(s) is s and rows(torch.zeros(2, 3)).shape == (6,)


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_streams", 0),
        ("sinkhorn_iters", 0),
        ("order", "rows"),
        ("init", "zeros"),
        ("constraint", "softmax"),
        ("coeff_dtype", torch.bfloat16),
        ("backend", "cuda"),
        ("eps", -1.0),
        ("recompute", "yes"),
        ("recompute_block", 0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MHCConfig.{field}"):
        MHCConfig(**{field: value})


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="n_stream"):
        MHCLayer(Block(8), dim=8, n_stream=4)


def test_recording_h_res_is_opt_in():
    layer = make(n=4)
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    layer(x)
    assert layer.last_h_res is None
    layer.record_h_res = True
    layer(x)
    _, _, h_res = layer.coefficients(x)
    torch.testing.assert_close(layer.last_h_res, h_res.reshape(-1, 4, 4).mean(0))


def test_torch_compile_of_a_small_stack_matches_eager():
    torch.manual_seed(0)
    # few iterations keep inductor's compile time (which grows with the unrolled loop) short
    stack = nn.ModuleList(
        MHCLayer(Block(16), dim=16, n_streams=4, sinkhorn_iters=3) for _ in range(2)
    )
    with torch.no_grad():
        for layer in stack:
            layer.bias.add_(0.5 * torch.randn_like(layer.bias))

    def run(x):
        h = expand_streams(x, 4)
        for layer in stack:
            h = layer(h)
        return collapse_streams(h)

    x = torch.randn(2, 5, 16)
    compiled = torch.compile(run, fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)]  # nothing cached is traced
    torch.testing.assert_close(out, run(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    (g_compiled,) = torch.autograd.grad(compiled(x).sum(), x)
    (g_eager,) = torch.autograd.grad(run(x).sum(), x)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)


def test_unconstrained_hc_starts_from_the_identity_residual():
    torch.manual_seed(0)
    block = Block(16)
    layer = MHCLayer(copy.deepcopy(block), dim=16, n_streams=4, constraint="none")
    x = torch.randn(3, 16)
    _, _, h_res = layer.coefficients(expand_streams(x, 4))
    torch.testing.assert_close(h_res, torch.eye(4).expand(3, 4, 4))
    out = layer(expand_streams(x, 4))
    torch.testing.assert_close(out[:, 0], x + block(x), rtol=2e-6, atol=2e-6)
