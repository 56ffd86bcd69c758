"""Activation recomputation for a chain of mHC connections (paper §4.3.2), and the fused backward.

A connection with either option runs as three autograd Functions whose backwards are written
here, the projection ``x -> (v @ phi, sum(v^2))``, the pre-mix and the merge, with the coefficient
path (scale, bias, gates, Sinkhorn) between the first two as plain autograd and the branch between
the last two. Autograd runs their backwards in the order merge, branch, pre-mix, coefficients,
projection: each reads the stream input ``x_l`` for its own gradients, the projection's last.

Without recomputation a connection keeps, for its backward, its n-stream input ``x_l`` (n * C values
per token in the streams' dtype), its branch output ``y_l``, its coefficients and the coefficient
path's intermediates. A plain residual keeps none of these; ``x_l`` alone is 16 * C bytes per token
for n = 4 fp32 streams, most of what mHC adds; the coefficient path's intermediates are about
3 (n^2 + 2n) + 2n + 1 floats per token (81 for n = 4, 1.4% of one fp32 stream at C = 1488; a
Sinkhorn kernel that copies its strided logits adds n^2).

Consecutive connections are tied by their merge, ``x_{l+1} = H_res,l x_l + H_post,l^T y_l``, and
``y_l``, ``H_post,l``, ``H_res,l`` are kept anyway (the merge's backward needs them). So a block of
``block`` consecutive connections keeps only the stream input of its first connection; the backward
rebuilds the others by re-running the merges from it. Nothing else is re-run: re-running the
coefficient path as well (an earlier version) saved those few floats per token for a nested
autograd call per connection, about 0.5 ms of host time that an eager GPU step pays in full
(benchmarks/host_overhead.py).

Kept per connection: ``y_l``, the coefficients and the coefficient path's intermediates (and
whatever the branch keeps for itself), plus one stream per block. While the backward walks through
a block, up to ``block - 1`` rebuilt streams are alive at once; each is dropped after the last
backward that reads it (the connection's projection backward: a rebuilt stream is a merge's
output, so it needs a gradient and that backward runs). The paper picks
``block ~ sqrt(n L / (n + 2))`` for ``L`` connections. ``block = 1`` keeps every connection's stream
input.

A rebuilt stream is the forward's, bit for bit (the same kernels on the same inputs), so gradients
equal those without recomputation. The connection's operations ignore autocast (float32 coefficient
math, :func:`mhc_kernels.sinkhorn.reference.autocast_exempt`), so no autocast state is replayed.

Gradients of gradients are not available with recomputation (``create_graph=True`` raises).

The fused backward (``MHCConfig.fused_backward``): without it the gradient of a stream input is
three stream tensors that autograd adds (the merge's ``H_res^T g_out``, the pre-mix's
``H_pre g_in``, the projection's ``2 v dsumsq + dproj phi^T``: 3 S written, 6 S of traffic to add
them). With it the merge's and the pre-mix's backwards skip their terms and hand their upstream
gradients to the projection's backward of the same connection through a :class:`_Link`, and that
backward writes all three terms at once (:func:`mhc_kernels.streams.stream_grad`). The hand-over
is dropped at the end of each backward pass, so a pass that stops between them leaves nothing
behind. Nothing is re-run for it (the first version re-ran the coefficient path inside a nested
autograd call, as recomputation did), and it keeps what autograd keeps.

How a stream finds its recipe: the connection's output (the merge's, in the caller's shape)
carries it as an attribute. The first connection's input, when :func:`mhc_kernels.expand_streams`
made it, carries its source instead (n identical copies of C values), and the first connection
keeps only the source: C values per token instead of n * C. A consumer that receives anything
else (a view, a stream changed in place since it was made, the output of a plain residual in
between) keeps the tensor it was given.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._host import rows, shaped
from .coefficients import projection_backward
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
    with torch.no_grad():  # the connection's Functions take the streams as rows of tokens
        return rows(expand(kept, ctx.expanded_from), ctx.expanded_from, kept.shape[-1])


def _save(ctx, rebuild: _Rebuild | _Expanded | None, x: torch.Tensor, *others: torch.Tensor):
    """Save ``others`` and, as ``rebuild`` (``x``'s, looked up once per connection) allows, ``x``
    itself, its source, or nothing."""
    ctx.rebuild, ctx.expanded_from = rebuild, None
    if isinstance(rebuild, _Expanded):  # keep the source (no reference to it in ctx otherwise)
        ctx.rebuild, ctx.expanded_from = None, rebuild.n
        ctx.save_for_backward(rebuild.source, *others)
    else:
        ctx.save_for_backward(*(others if rebuild is not None else (x, *others)))


class _Link:
    """The fused backward's hand-over within one connection: the merge's and the pre-mix's
    backwards leave their upstream gradients (and H_res, H_pre) here instead of computing their
    stream-gradient terms, and the projection's backward, which autograd runs after both (the
    coefficients come from the projection), adds those terms into the stream gradient it writes
    anyway. Dropped when the backward pass ends, taken or not, so that a later pass never sees a
    stale one."""

    __slots__ = ("merge", "pre_mix")

    def __init__(self):
        self.drop()

    def put(self, part: str, grad: torch.Tensor, h: torch.Tensor) -> None:
        setattr(self, part, (grad, h))
        torch.autograd.Variable._execution_engine.queue_callback(self.drop)

    def take(self):
        """``((g_out, H_res), (g_in, H_pre))``, each ``None`` if its backward did not run."""
        parts = self.merge, self.pre_mix
        self.drop()
        return parts

    def drop(self) -> None:
        self.merge = self.pre_mix = None


class _Projection(torch.autograd.Function):
    """``x -> (v @ phi, sum(v^2))`` keeping phi and (unless it can be rebuilt) ``x``. Its backward
    runs after every other one of the connection (the coefficients, hence the pre-mix and merge,
    depend on it), so it is the last to read ``x``; with a ``link`` it writes the connection's
    whole stream gradient (:func:`stream_grad`), without one the projection's term alone."""

    @staticmethod
    def forward(ctx, connection, rebuild, link, x, phi):
        ctx.connection, ctx.link = connection, link
        _save(ctx, rebuild, x, phi)
        return connection.project(x, phi)

    @staticmethod
    @once_differentiable
    def backward(ctx, dproj, dsumsq):
        backend = ctx.connection.config.backend
        phi = _saved(ctx)[-1]
        x = _stream_input(ctx)
        _done(ctx)
        needs_x, needs_phi = ctx.needs_input_grad[3:]
        fused = ctx.link is not None and needs_x
        v = x.reshape(*x.shape[:-2], phi.shape[0])
        dv, dphi = projection_backward(v, phi, dproj, dsumsq, backend,
                                       want_dv=needs_x and not fused, want_dphi=needs_phi)  # fmt: skip
        dx = None if dv is None else dv.reshape(x.shape)
        if fused:
            merged, mixed = ctx.link.take()
            g_out, h_res = merged or (None, dproj.new_zeros((*x.shape[:-1], x.shape[-2])))
            if mixed is None:  # the branch ignored its input
                mixed = x.new_zeros((*x.shape[:-2], x.shape[-1])), dproj.new_zeros(x.shape[:-1])
            g_in, h_pre = mixed
            dx = stream_grad(x, g_in, g_out, h_pre, h_res, dsumsq, dproj, phi, backend)
        if ctx.rebuild is not None:
            ctx.rebuild.release()  # the last backward that reads this stream
        return None, None, None, dx, dphi


class _PreMix(torch.autograd.Function):
    """``H_pre x`` keeping H_pre and (unless it can be rebuilt) ``x``; the backward runs the
    pre-mix's backward alone, and with a ``link`` leaves its stream-gradient term to the
    projection's backward (reading x for the gradient of H_pre only)."""

    @staticmethod
    def forward(ctx, backend, rebuild, link, x, h_pre):
        ctx.backend, ctx.link = backend, link
        _save(ctx, rebuild, x, h_pre)
        return pre_mix(x, h_pre, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h_pre = _saved(ctx)[-1]
        x = _stream_input(ctx)
        _done(ctx)
        needs_x, needs_h = ctx.needs_input_grad[3:]
        fused = ctx.link is not None and needs_x
        dx, dh = pre_mix_backward(x, h_pre, grad, ctx.backend, want_dx=needs_x and not fused)
        if fused:
            ctx.link.put("pre_mix", grad, h_pre)
        return None, None, None, dx, dh if needs_h else None


class _Merge(torch.autograd.Function):
    """``H_res x + H_post^T y`` keeping ``y``, the coefficients and (unless it can be rebuilt)
    ``x``; the backward runs the merge's backward alone, and with a ``link`` leaves its
    stream-gradient term to the projection's backward."""

    @staticmethod
    def forward(ctx, backend, rebuild, link, x, y, h_post, h_res):
        ctx.backend, ctx.link = backend, link
        _save(ctx, rebuild, x, y, h_post, h_res)
        return merge(x, y, h_post, h_res, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, h_post, h_res = _saved(ctx)[-3:]
        x = _stream_input(ctx)
        _done(ctx)
        needs = ctx.needs_input_grad[3:]
        fused = ctx.link is not None and needs[0]
        grads = merge_backward(
            x, y, h_post, h_res, grad, ctx.backend, want_dx=needs[0] and not fused
        )
        if fused:
            ctx.link.put("merge", grad, h_res)
        grads = (g if need else None for g, need in zip(grads, needs, strict=True))
        return None, None, None, *grads


def connect(connection, x: torch.Tensor, branch, *args, **kwargs):
    """``connection.connect`` with recomputation and/or the fused backward (as its config says):
    returns ``(output, H_res)``. Autograd runs the connection's backwards in the order merge,
    branch, pre-mix, coefficients, projection; a rebuilt stream (a merge's output, so it needs a
    gradient, so the projection's backward runs) is dropped after the projection's."""
    config = connection.config
    rebuild = _rebuild_of(x) if config.recompute else None
    link = _Link() if config.fused_backward else None
    # the tokens as rows, once (as HyperConnection does): the Functions, their saved tensors and
    # rebuilt streams all have the kernels' layout; the branch and the next connection see the
    # caller's shape (the recipe of the output travels on the tensor returned)
    x2 = rows(x, *x.shape[-2:])
    proj, sumsq = _Projection.apply(connection, rebuild, link, x2, connection.phi)
    h_pre, h_post, h_res = connection.gates(proj, sumsq, connection.alpha, connection.bias)
    branch_in = _PreMix.apply(config.backend, rebuild, link, x2, h_pre)
    y = connection.run_branch_on_rows(branch, branch_in, x, *args, **kwargs)
    out = _Merge.apply(config.backend, rebuild, link, x2, y, h_post, h_res)
    merge_node, out = out.grad_fn, shaped(out, x.shape)
    depth = 1 + (rebuild.depth if isinstance(rebuild, _Rebuild) else 0)  # kept x: depth 0
    if config.recompute and depth < config.recompute_block and merge_node is not None:
        setattr(out, _ATTRIBUTE, _Rebuild(merge_node, depth, out._version))
    return out, h_res
