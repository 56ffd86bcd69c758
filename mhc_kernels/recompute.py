"""Activation recomputation for a chain of mHC connections (paper §4.3.2), and the fused backward.

A connection with either option runs as two autograd Functions, coefficients + pre-mix and merge,
with the branch between them; their backwards are written here.

Without recomputation a connection keeps, for its backward, its n-stream input ``x_l`` (n * C values
per token in the streams' dtype), its branch output ``y_l``, its coefficients and every
intermediate of the coefficient path. A plain residual keeps none of these; ``x_l`` alone is
16 * C bytes per token for n = 4 fp32 streams, most of what mHC adds.

Consecutive connections are tied by their merge, ``x_{l+1} = H_res,l x_l + H_post,l^T y_l``, and
``y_l``, ``H_post,l``, ``H_res,l`` are kept anyway (the merge's backward needs them). So a block of
``block`` consecutive connections keeps only the stream input of its first connection; the backward
rebuilds the others by re-running the merges from it, and every connection re-runs its coefficients
and pre-mix from its (kept or rebuilt) input in its own backward.

Kept per connection: ``y_l`` and the n^2 + 2n coefficients per token (and whatever the branch keeps
for itself), plus one stream per block. While the backward walks through a block, up to ``block - 1``
rebuilt streams are alive at once; each is dropped after the last backward that reads it (the
connection's coefficient and pre-mix backward). The paper picks ``block ~ sqrt(n L / (n + 2))`` for
``L`` connections. ``block = 1`` keeps every connection's stream input (recomputation within the
connection only).

A rebuilt stream is the forward's, bit for bit (the same kernels on the same inputs), so gradients
equal those without recomputation. The connection's operations ignore autocast (float32 coefficient
math, :func:`mhc_kernels.sinkhorn.reference.autocast_exempt`), so no autocast state is replayed.

Gradients of gradients are not available with recomputation (``create_graph=True`` raises).

The fused backward (``MHCConfig.fused_backward``): without it the gradient of a stream input is
three stream tensors that autograd adds (the merge's ``H_res^T g_out``, the pre-mix's
``H_pre g_in``, the projection's ``2 v dsumsq + dproj phi^T``: 3 S written, 6 S of traffic to add
them). With it the merge's backward skips its term and hands its upstream gradient ``g_out`` to the
coefficient backward of the same connection through a :class:`_Link` (autograd runs that backward
after the merge's, which reads its H_post and H_res), and that backward writes all three terms at
once (:func:`mhc_kernels.streams.stream_grad`). The hand-over is dropped at the end of each backward
pass, so a pass that stops between the two leaves nothing behind. It keeps the projection
``(v @ phi, sum(v^2))`` (n^2 + 2n + 1 floats per token) and re-runs only the small coefficient
epilogue in backward; combined with recomputation, the stream input is kept or rebuilt as above.

How a stream finds its recipe: the merge's output tensor carries it as an attribute. The first
connection's input, when :func:`mhc_kernels.expand_streams` made it, carries its source instead
(n identical copies of C values), and the first connection keeps only the source: C values per
token instead of n * C. A consumer that receives anything else (a view, a stream changed in place
since it was made, the output of a plain residual in between) keeps the tensor it was given.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .coefficients import projection_weight_grad
from .streams import merge, merge_backward, pre_mix, pre_mix_backward, stream_grad

_ATTRIBUTE = "_mhc_rebuild"


class _Rebuild:
    """How the backward gets one stream back: re-run the merge that produced it (``merge_node``,
    the merge's autograd node) from that merge's saved inputs (unpacked once: :func:`_saved`)."""

    __slots__ = ("merge_node", "depth", "version", "value")

    def __init__(self, merge_node, depth: int, version: int):
        self.merge_node, self.depth, self.version = merge_node, depth, version
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            node = self.merge_node
            y, h_post, h_res = _saved(node)[-3:]
            with torch.no_grad():
                self.value = merge(_stream_input(node), y, h_post, h_res, node.backend)
        return self.value

    def release(self) -> None:
        self.value = None


class _Expanded:
    """Streams made by :func:`expand` from ``source``: a recomputing connection keeps the source
    (C values per token) instead of the n streams and expands it again in backward."""

    __slots__ = ("source", "n", "version")

    def __init__(self, source: torch.Tensor, n: int, version: int):
        self.source, self.n, self.version = source, n, version


def expand(source: torch.Tensor, n: int) -> torch.Tensor:
    """``(..., C) -> (..., n, C)``: n contiguous copies, marked (when gradients are on) with their
    source for a recomputing first connection; every connection drops the mark once it has run."""
    out = source.unsqueeze(-2).expand(*source.shape[:-1], n, source.shape[-1]).contiguous()
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        setattr(out, _ATTRIBUTE, _Expanded(source, n, out._version))
    return out


def forget_source(x: torch.Tensor) -> None:
    """Drop an :func:`expand` mark (and so the reference to its source) from ``x``."""
    if not torch.compiler.is_compiling() and isinstance(getattr(x, _ATTRIBUTE, None), _Expanded):
        delattr(x, _ATTRIBUTE)


def _rebuild_of(x: torch.Tensor) -> _Rebuild | _Expanded | None:
    rebuild = getattr(x, _ATTRIBUTE, None)
    return rebuild if rebuild is not None and rebuild.version == x._version else None


def _saved(ctx) -> tuple[torch.Tensor, ...]:
    """``ctx.saved_tensors``, unpacked once per backward: a merge's are read by the rebuild of its
    output and then by its own backward, and torch.utils.checkpoint (non-reentrant) lets each
    saved tensor be unpacked only once. The backward that owns ``ctx`` ends with :func:`_done`."""
    saved = getattr(ctx, "unpacked", None)
    if saved is None:
        saved = ctx.unpacked = ctx.saved_tensors
    return saved


def _done(ctx) -> None:
    """Drop :func:`_saved`'s references at the end of ``ctx``'s backward (autograd frees the saved
    tensors themselves then; a reference here would keep them to the end of the step)."""
    ctx.unpacked = None


def _stream_input(ctx) -> torch.Tensor:
    """The stream input of the Function whose context is ``ctx``: rebuilt by merges, or kept as
    the first saved tensor (the streams themselves, or the source they were expanded from)."""
    if ctx.rebuild is not None:
        return ctx.rebuild.get()
    kept = _saved(ctx)[0]
    if ctx.expanded_from is None:
        return kept
    with torch.no_grad():
        return expand(kept, ctx.expanded_from)


def _save(ctx, rebuild: _Rebuild | _Expanded | None, x: torch.Tensor, *others: torch.Tensor):
    """Save ``others`` and, as ``rebuild`` (``x``'s, looked up once per connection) allows, ``x``
    itself, its source, or nothing."""
    ctx.rebuild, ctx.expanded_from = rebuild, None
    if isinstance(rebuild, _Expanded):  # keep the source (no reference to it in ctx otherwise)
        ctx.rebuild, ctx.expanded_from = None, rebuild.n
        ctx.save_for_backward(rebuild.source, *others)
    else:
        ctx.save_for_backward(*(others if rebuild is not None else (x, *others)))


def _grads(outputs, upstream, inputs) -> tuple[torch.Tensor | None, ...]:
    """Gradients for ``inputs`` (``None`` for those that do not require one)."""
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(outputs, wanted, upstream, allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in inputs)


def _detached(tensors, needs) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]


class _CoefficientsAndPreMix(torch.autograd.Function):
    """``x -> (H_pre x, H_post, H_res)`` keeping only the parameters and (unless it can be rebuilt)
    ``x``; the backward re-runs the coefficients, then runs the pre-mix's backward alone."""

    @staticmethod
    def forward(ctx, connection, rebuild, x, phi, bias, alpha):
        ctx.connection = connection
        _save(ctx, rebuild, x, phi, bias, alpha)
        h_pre, h_post, h_res = connection.coefficients_from(x, phi, bias, alpha)
        return pre_mix(x, h_pre, connection.config.backend), h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_in, g_post, g_res):
        inputs = _detached((_stream_input(ctx), *_saved(ctx)[-3:]), ctx.needs_input_grad[2:])
        _done(ctx)
        with torch.enable_grad():
            h_pre, h_post, h_res = ctx.connection.coefficients_from(*inputs)
        # the pre-mix's backward alone (its output is not needed), then the coefficients'
        x = inputs[0].detach()
        dx, dh_pre = pre_mix_backward(x, h_pre.detach(), g_in, ctx.connection.config.backend)
        grads = _grads((h_pre, h_post, h_res), (dh_pre, g_post, g_res), inputs)
        if ctx.rebuild is not None:
            ctx.rebuild.release()  # the last backward that reads this stream
        if not inputs[0].requires_grad:
            return None, None, *grads
        return None, None, dx if grads[0] is None else grads[0] + dx, *grads[1:]


class _Link:
    """The fused backward's hand-over within one connection: the merge's backward leaves its
    upstream gradient here instead of computing its stream-gradient term, and the coefficient
    backward (which autograd runs after it: the merge reads its H_post and H_res) takes it and
    adds that term into the stream gradient it writes anyway. Dropped when the backward pass
    ends, taken or not, so that a later pass never sees a stale one."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: torch.Tensor | None = None

    def put(self, grad: torch.Tensor) -> None:
        self.grad = grad
        torch.autograd.Variable._execution_engine.queue_callback(self.drop)

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad

    def drop(self) -> None:
        self.grad = None


class _FusedCoefficientsAndPreMix(torch.autograd.Function):
    """``x -> (H_pre x, H_post, H_res)`` keeping the parameters, the projection ``(v @ phi,
    sum(v^2))``, H_pre, H_res and (unless it can be rebuilt) ``x``. The backward writes the
    connection's whole stream gradient in one pass: the pre-mix's gradient of H_pre first (a
    read of x, no stream written), the coefficients' backward (scale, gates, Sinkhorn: small,
    re-run under autograd), then :func:`stream_grad` with the merge's upstream gradient from
    ``link`` and the parameter gradient of phi."""

    @staticmethod
    def forward(ctx, connection, rebuild, link, x, phi, bias, alpha):
        ctx.connection, ctx.link = connection, link
        proj, sumsq = connection.project(x, phi)
        h_pre, h_post, h_res = connection.gates(proj, sumsq, alpha, bias)
        _save(ctx, rebuild, x, phi, bias, alpha, proj, sumsq, h_pre, h_res)
        return pre_mix(x, h_pre, connection.config.backend), h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_in, g_post, g_res):
        connection, backend = ctx.connection, ctx.connection.config.backend
        phi, bias, alpha, proj, sumsq, h_pre, h_res = _saved(ctx)[-7:]
        needs_x, needs_phi, needs_bias, needs_alpha = ctx.needs_input_grad[3:]
        x, g_out = _stream_input(ctx), ctx.link.take()
        _done(ctx)
        if g_in is None:  # the branch ignored its input
            g_in = x.new_zeros((*x.shape[:-2], x.shape[-1]))
        _, dh_pre = pre_mix_backward(x, h_pre, g_in, backend, want_dx=False)
        leaves = _detached((proj, sumsq, alpha, bias), (True, True, needs_alpha, needs_bias))
        with torch.enable_grad():
            gates = connection.gates(*leaves)
        pairs = [
            (h, g) for h, g in zip(gates, (dh_pre, g_post, g_res), strict=True) if g is not None
        ]
        dproj, dsumsq, dalpha, dbias = _grads(*zip(*pairs, strict=True), inputs=leaves)
        dx = dphi = None
        if needs_x:
            dx = stream_grad(x, g_in, g_out, h_pre, h_res, dsumsq, dproj, phi, backend)
        if needs_phi:
            dphi = projection_weight_grad(x, dproj, phi, backend)
        if ctx.rebuild is not None:
            ctx.rebuild.release()  # the last backward that reads this stream
        return None, None, None, dx, dphi, dbias, dalpha


class _Merge(torch.autograd.Function):
    """``H_res x + H_post^T y`` keeping ``y``, the coefficients and (unless it can be rebuilt)
    ``x``; the backward runs the merge's backward alone (PyTorch path: through autograd). With a
    ``link`` (fused backward) it leaves its stream-gradient term to the coefficient backward."""

    @staticmethod
    def forward(ctx, backend, last_reader, rebuild, link, x, y, h_post, h_res):
        ctx.backend, ctx.last_reader, ctx.link = backend, last_reader, link
        _save(ctx, rebuild, x, y, h_post, h_res)
        return merge(x, y, h_post, h_res, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        inputs = (_stream_input(ctx), *_saved(ctx)[-3:])
        _done(ctx)
        needs = ctx.needs_input_grad[4:]
        fused = ctx.link is not None
        grads = merge_backward(*inputs, grad, ctx.backend, want_dx=not fused)
        if fused and needs[0]:
            ctx.link.put(grad)
        if ctx.rebuild is not None and ctx.last_reader:
            ctx.rebuild.release()
        return (
            None,
            None,
            None,
            None,
            *(g if need else None for g, need in zip(grads, needs, strict=True)),
        )


def connect(connection, x: torch.Tensor, branch, *args, **kwargs):
    """``connection.connect`` with recomputation and/or the fused backward (as its config says):
    returns ``(output, H_res)``."""
    config = connection.config
    rebuild = _rebuild_of(x) if config.recompute else None
    params = (connection.phi, connection.bias, connection.alpha)
    link = None
    if config.fused_backward:
        link = _Link()
        branch_in, h_post, h_res = _FusedCoefficientsAndPreMix.apply(
            connection, rebuild, link, x, *params
        )
    else:
        branch_in, h_post, h_res = _CoefficientsAndPreMix.apply(connection, rebuild, x, *params)
    y = connection.run_branch(branch, branch_in, *args, **kwargs)
    # the coefficient backward reads x after the merge's; when it is not on the graph (frozen
    # parameters, x without gradient) the merge's backward is the last one that reads x
    last_reader = not h_post.requires_grad
    out = _Merge.apply(config.backend, last_reader, rebuild, link, x, y, h_post, h_res)
    depth = 1 + (rebuild.depth if isinstance(rebuild, _Rebuild) else 0)  # kept x: depth 0
    if config.recompute and depth < config.recompute_block and out.grad_fn is not None:
        setattr(out, _ATTRIBUTE, _Rebuild(out.grad_fn, depth, out._version))
    return out, h_res
