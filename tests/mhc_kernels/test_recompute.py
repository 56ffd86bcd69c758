"""Recomputation across a chain of connections (mhc_kernels.recompute, paper §4.3.2): the same
outputs and gradients as keeping everything, one kept stream per block, rebuilt streams dropped."""

import math

import pytest
import torch
from torch import nn

from mhc_kernels import MHCLayer, expand_streams, recompute

C, N, LAYERS = 16, 4, 6


def make_stack(backend="torch", dtype=torch.float32, **options):
    torch.manual_seed(1)
    layers = [
        MHCLayer(
            nn.Sequential(nn.LayerNorm(C), nn.Linear(C, C)).to(dtype),
            C,
            N,
            init="paper",
            backend=backend,
            **options,
        )  # fmt: skip
        for _ in range(LAYERS)
    ]
    for layer in layers:  # a live dynamic term in every coefficient
        nn.init.normal_(layer.phi, std=0.3)
        layer.alpha.data.fill_(0.5)
    return layers


def run(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def outputs_and_grads(layers, x, upstream, fn=None):
    x = x.detach().requires_grad_()
    out = fn(x) if fn else run(layers, x)
    params = [p for layer in layers for p in layer.parameters()]
    return [out, *torch.autograd.grad(out, [x, *params], upstream)]


def saved_storage_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("block", [1, 2, 4, LAYERS, 100])
def test_outputs_and_every_gradient_equal_keeping_everything(block):
    x, upstream = torch.randn(3, 5, N, C), torch.randn(3, 5, N, C)
    expected = outputs_and_grads(make_stack(), x, upstream)
    got = outputs_and_grads(make_stack(recompute=True, recompute_block=block), x, upstream)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


LEAN = [
    {"recompute": True, "recompute_block": 3},
    {"fused_backward": True},
    {"fused_backward": True, "recompute": True, "recompute_block": 3},
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_streams_and_fused_kernels(backend, dtype, device):
    """Either backend rebuilds the streams (Triton: interpreter on CPU) and runs the fused
    backward, bf16 streams included. Gradients of a stream sum the same terms in another order
    (the coefficient, pre-mix and merge parts arrive together), so the bound is the float64
    reference's: within 4x the larger error of the runs that keep everything (either backend),
    plus one rounding (2x until the H200's launches of 2026-11-27: a float32 parameter gradient
    of the fused backward was then 2.4x the kept runs' error, 8.4e-6 on 5.2)."""
    x, upstream = torch.randn(2, 7, N, C, device=device), torch.randn(2, 7, N, C, device=device)

    def results(backend, dt, **options):
        layers = [layer.to(device) for layer in make_stack(backend, dt, **options)]
        if dt == torch.float64:  # coefficients too
            layers = [layer.double() for layer in layers]
        return [t.double() for t in outputs_and_grads(layers, x.to(dt), upstream.to(dt))]

    exact = results("torch", torch.float64)
    kept = results(backend, dtype)
    other = results("triton" if backend == "torch" else "torch", dtype)
    for options in LEAN:
        lean = results(backend, dtype, **options)
        for i, (g, k, o, e) in enumerate(zip(lean, kept, other, exact, strict=True)):
            error = torch.maximum((k - e).abs().max(), (o - e).abs().max())
            bound = 4 * error + torch.finfo(dtype).eps * e.abs().max()
            assert (g - e).abs().max() <= bound, f"{options}: output/gradient {i}"


@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_one_stream_is_kept_per_block(block):
    """Streams made by expand_streams, as in a model: the first connection keeps only their
    source, every block of connections one stream, and nothing else differs from autograd."""
    source = torch.randn(3, 5, C, requires_grad=True)
    stream_bytes, source_bytes = N * source.numel() * 4, source.numel() * 4

    def saved(inputs, **options):  # the streams made anew: a connection drops their mark
        return saved_storage_bytes(lambda: run(make_stack(**options), inputs()))

    streams = lambda: expand_streams(source, N)  # noqa: E731
    every = saved(streams, recompute=True)
    assert (
        every - saved(streams, recompute=True, recompute_block=block)
        == (LAYERS - math.ceil(LAYERS / block)) * stream_bytes
    )
    assert saved(streams) - every == stream_bytes - source_bytes
    x = torch.randn(3, 5, N, C, requires_grad=True)  # streams of unknown origin: kept whole
    assert saved(lambda: x, recompute=True) == saved(lambda: x)


def rebuilds(outputs):
    return [r for r in (getattr(t, recompute._ATTRIBUTE, None) for t in outputs) if r is not None]


def alive(objects):
    return sum(r.value is not None for r in objects)


@pytest.mark.parametrize("block", [2, 3, 4])
def test_backward_holds_at_most_block_minus_one_rebuilt_streams(block, monkeypatch):
    layers = make_stack(recompute=True, recompute_block=block)
    outputs, h = [], torch.randn(2, 3, N, C, requires_grad=True)
    for layer in layers:
        h = layer(h)
        outputs.append(h)
    objects = rebuilds(outputs)
    assert len(objects) == LAYERS - math.ceil(LAYERS / block) + (LAYERS % block != 0)
    peak, get = [], recompute._Rebuild.get
    monkeypatch.setattr(
        recompute._Rebuild, "get", lambda self: (get(self), peak.append(alive(objects)))[0]
    )
    h.square().sum().backward(retain_graph=True)
    assert max(peak) == block - 1 and alive(objects) == 0
    first = [p.grad.clone() for p in layers[0].parameters()]
    for layer in layers:
        layer.zero_grad()
    h.square().sum().backward()  # rebuilt again after the release
    for p, g in zip(layers[0].parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(RuntimeError, match="second time"):
        h.square().sum().backward()


def test_frozen_connections_training_only_the_branches():
    """Like LoRA without trainable mHC: the merge's backward is the last reader of each stream."""
    x, upstream = torch.randn(3, 5, N, C), torch.randn(3, 5, N, C)
    stacks = [make_stack(), make_stack(recompute=True, recompute_block=3)]
    grads = []
    for layers in stacks:
        for layer in layers:
            for p in (layer.phi, layer.bias, layer.alpha):
                p.requires_grad_(False)
        outputs, h = [], x
        for layer in layers:
            h = layer(h)
            outputs.append(h)
        branch = [p for layer in layers for p in layer.branch.parameters()]
        grads.append(torch.autograd.grad(h, branch, upstream))
        assert alive(rebuilds(outputs)) == 0
    for g, e in zip(*grads, strict=True):
        torch.testing.assert_close(g, e)


def test_streams_changed_between_connections_are_kept_not_rebuilt():
    """An in-place change, a view or a plain residual in between: the next connection keeps what
    it was given, and the gradients stay right."""

    def mixed(layers, x):
        x = layers[0](layers[1](x))
        x.mul_(0.5)  # in place: the merge's recipe no longer gives this tensor
        x = layers[2](x).clone()  # another op: no recipe at all
        x = layers[3](x)
        x = layers[4](x.view(x.shape))  # a view
        return layers[5](x)

    x, upstream = torch.randn(3, 5, N, C), torch.randn(3, 5, N, C)
    results = []
    for layers in (make_stack(), make_stack(recompute=True, recompute_block=LAYERS)):
        xg = x.clone().requires_grad_()
        out = mixed(layers, xg)
        params = [p for layer in layers for p in layer.parameters()]
        results.append([out, *torch.autograd.grad(out, [xg, *params], upstream)])
    for g, e in zip(*results, strict=True):
        torch.testing.assert_close(g, e)


def test_no_recomputation_without_gradients():
    layers = make_stack(recompute=True, recompute_block=3)
    with torch.no_grad():
        out = run(layers, torch.randn(2, N, C))
    assert out.grad_fn is None and not hasattr(out, recompute._ATTRIBUTE)


def test_recording_h_res_works_with_recomputation():
    layer = make_stack(recompute=True, recompute_block=2)[0]
    layer.record_h_res = True
    x = torch.randn(2, 3, N, C)
    layer(x.requires_grad_())
    _, _, h_res = layer.coefficients(x)
    torch.testing.assert_close(layer.last_h_res, h_res.detach().reshape(-1, N, N).mean(0))


def test_torch_compile_falls_back_to_checkpointing_each_connection():
    """torch.compile cannot trace the rebuild of streams (objects attached to tensors and autograd
    nodes): compiled, each connection is checkpointed on its own (fullgraph), with the eager
    gradients."""
    layers = make_stack(recompute=True, recompute_block=3)[:2]
    for layer in layers:
        layer.config.sinkhorn_iters = 3  # a short unrolled loop keeps the compile quick
    x, upstream = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)
    compiled = torch.compile(lambda t: run(layers, t), fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(layers, x, upstream, fn=compiled)
    for g, e in zip(got, outputs_and_grads(layers, x, upstream), strict=True):
        torch.testing.assert_close(g, e)


def test_gradients_of_gradients_are_refused_not_wrong():
    layers = make_stack(recompute=True, recompute_block=2)
    x = torch.randn(2, 3, N, C, requires_grad=True)
    (grad,) = torch.autograd.grad(run(layers, x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_streams_from_expand_streams_keep_only_their_source():
    """The first connection keeps the C-wide source of expand_streams, not its n copies; the
    gradients reach the source as without recomputation."""
    source = torch.randn(3, 5, C)
    upstream = torch.randn(3, 5, N, C)
    results = []
    for options in ({}, {"recompute": True, "recompute_block": 3}):
        layers = make_stack(**options)
        s = source.clone().requires_grad_()
        nbytes = saved_storage_bytes(lambda s=s, layers=layers: run(layers, expand_streams(s, N)))
        out = run(layers, expand_streams(s, N))
        params = [p for layer in layers for p in layer.parameters()]
        results.append((nbytes, [out, *torch.autograd.grad(out, [s, *params], upstream)]))
    (kept_bytes, kept), (lean_bytes, lean) = results
    copies = make_stack(recompute=True, recompute_block=3)
    pre_expanded = saved_storage_bytes(lambda: run(copies, expand_streams(source, N).clone()))
    assert pre_expanded - lean_bytes == (N - 1) * source.numel() * 4  # n copies -> one source
    assert lean_bytes < kept_bytes
    for g, e in zip(lean, kept, strict=True):
        torch.testing.assert_close(g, e)


def test_every_connection_drops_the_expand_mark():
    """Without recomputation nothing needs the source: the mark (a reference to it) goes with the
    first connection, so the source is not kept alive by the streams."""
    import weakref

    layer = make_stack()[0]
    source = torch.randn(2, 3, C) * 2  # not a leaf the test holds on to
    alive = weakref.ref(source)
    x = expand_streams(source, N)
    del source
    assert alive() is not None  # held by the mark until a connection has run
    out = layer(x)
    assert alive() is None and out.shape == x.shape


# ----------------------------------------------------------------------------- fused backward


def test_fused_backward_equals_autograds_sum_of_the_three_stream_gradients():
    x, upstream = torch.randn(3, 5, N, C), torch.randn(3, 5, N, C)
    expected = outputs_and_grads(make_stack(), x, upstream)
    for options in LEAN[1:]:
        got = outputs_and_grads(make_stack(**options), x, upstream)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)


class Constant(nn.Module):
    def forward(self, h):
        return torch.ones_like(h)


def test_fused_backward_for_partial_requests_and_frozen_parameters():
    """Gradients of the parameters alone, of the streams alone, with frozen connections (LoRA
    without trainable mHC) and for a branch that ignores its input: each as autograd's."""
    x, upstream = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)

    def grads(layers, wanted, freeze=False, ignore_input=False):
        if freeze:
            for layer in layers:
                for p in (layer.phi, layer.bias, layer.alpha):
                    p.requires_grad_(False)
        if ignore_input:
            layers[2].branch = Constant()
        xg = x.clone().requires_grad_()
        inputs = {"x": [xg], "params": [p for layer in layers for p in layer.parameters()
                                         if p.requires_grad]}[wanted]  # fmt: skip
        return torch.autograd.grad(run(layers, xg), inputs, upstream)

    for case in [("params",), ("x",), ("x", True), ("params", False, True)]:
        got = grads(make_stack(fused_backward=True), *case)
        for g, e in zip(got, grads(make_stack(), *case), strict=True):
            torch.testing.assert_close(g, e)


def test_fused_backward_hand_over_ends_with_each_backward_pass():
    """The merge's gradient handed to the projection's backward is dropped when a pass ends: a
    pass that stops between the two (asking only for the last branch's weights: the last merge
    runs, its projection's backward does not) leaves nothing that a later pass on the retained
    graph could add twice."""
    layers = make_stack(fused_backward=True)
    x = torch.randn(2, 3, N, C, requires_grad=True)
    out = run(layers, x)
    upstream = torch.randn_like(out)
    handed = []
    put = recompute._Link.put
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recompute._Link, "put", lambda self, *a: (handed.append(self), put(self, *a)))
        torch.autograd.grad(out, list(layers[-1].branch.parameters()), upstream, retain_graph=True)
    assert len(handed) == 1 and handed[0].take() == (None, None)
    (got,) = torch.autograd.grad(out, x, upstream, retain_graph=True)
    (again,) = torch.autograd.grad(out, x, upstream)
    plain = make_stack()
    (expected,) = torch.autograd.grad(run(plain, x), x, upstream)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)


@pytest.mark.parametrize("options", LEAN)
def test_backward_re_runs_neither_the_projection_nor_the_coefficients(options, monkeypatch):
    """Recomputation rebuilds streams, and nothing else: the coefficient path keeps its graph (its
    intermediates are a few floats per token) and the fused backward adds nothing to re-run either
    (re-running them inside a nested autograd call cost more host time than a small GPU step
    has)."""
    calls = {"gates": 0, "project": 0}
    for name in calls:
        real = getattr(MHCLayer, name)

        def counted(self, *args, _name=name, _real=real):
            calls[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(MHCLayer, name, counted)
    layers = make_stack(**options)
    out = run(layers, torch.randn(2, 3, N, C, requires_grad=True))
    out.square().sum().backward()
    assert calls == {"gates": LAYERS, "project": LAYERS}


def test_fused_backward_saves_no_more_than_autograd():
    x = torch.randn(3, 5, N, C, requires_grad=True)
    fused = saved_storage_bytes(lambda: run(make_stack(fused_backward=True), x))
    assert fused <= saved_storage_bytes(lambda: run(make_stack(), x))


def test_fused_backward_under_torch_compile_runs_as_without_it():
    layers = make_stack(fused_backward=True)[:2]
    for layer in layers:
        layer.config.sinkhorn_iters = 3
    x, upstream = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)
    compiled = torch.compile(lambda t: run(layers, t), fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(layers, x, upstream, fn=compiled)
    for g, e in zip(got, outputs_and_grads(layers, x, upstream), strict=True):
        torch.testing.assert_close(g, e)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (grad,) = torch.autograd.grad(run(layers, x.requires_grad_()).sum(), x, create_graph=True)
        grad.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [{}, *LEAN], ids=["kept", "recompute", "fused", "both"])
def test_no_tokens(backend, options, device):
    """An empty batch runs forward and backward on every path (zero parameter gradients)."""
    layer = make_stack(backend, **options)[0].to(device)
    x = torch.randn(0, N, C, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and float(layer.phi.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_inside_activation_checkpointing(reentrant):
    """Connections inside torch.utils.checkpoint (as a trainer's activation checkpointing wraps
    whole layers): the same gradients. Non-reentrant checkpointing lets each saved tensor be
    unpacked once; a merge's are read by the rebuild of its output and by its own backward."""
    from torch.utils.checkpoint import checkpoint

    x, upstream = torch.randn(2, 3, N, C), torch.randn(2, 3, N, C)

    def grads(layers, wrapped):
        xg = x.clone().requires_grad_()
        out = (checkpoint(lambda t: run(layers, t), xg, use_reentrant=reentrant) if wrapped
               else run(layers, xg))  # fmt: skip
        out.backward(upstream)
        return [xg.grad, *(p.grad for layer in layers for p in layer.parameters())]

    expected = grads(make_stack(), False)
    for options in LEAN:
        for g, e in zip(grads(make_stack(**options), True), expected, strict=True):
            torch.testing.assert_close(g, e)


class ScaledLinear(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, h, scale=1.0):
        return self.lin(h) * scale


@pytest.mark.parametrize("coefficients", ["fp32-torch", "fp32-triton", "fp64-torch"])
@pytest.mark.parametrize("constraint", ["sinkhorn", "none"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_fused_backward_for_every_stream_count_and_constraint(n, constraint, coefficients, device):
    """n = 1 to 8 (padded streams in the kernel), unconstrained HC, float64 coefficients, and
    branch keyword arguments: the fused backward's gradients are autograd's."""
    dtype, backend = coefficients.split("-")
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        layer = MHCLayer(ScaledLinear(24), 24, n, init="paper", constraint=constraint,
                         coeff_dtype=getattr(torch, {"fp32": "float32", "fp64": "float64"}[dtype]),
                         backend=backend, fused_backward=fused).to(device)  # fmt: skip
        nn.init.normal_(layer.phi, std=0.3)
        x = torch.randn(2, 5, n, 24, device=device).requires_grad_()
        out = layer(x, scale=0.7)
        results.append(
            [out, *torch.autograd.grad(out, [x, *layer.parameters()], torch.ones_like(out))]
        )
    for got, expected in zip(results[1], results[0], strict=True):  # fp32 streams: fp32 bounds
        torch.testing.assert_close(got.float(), expected.float())
