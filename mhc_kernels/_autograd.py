"""Two front doors for each fused kernel: a custom op for torch.compile, a plain Function for eager.

``torch.library.custom_op`` keeps torch.compile from tracing into the Triton launchers (no graph
breaks), but its dispatch costs about 120 us per forward + backward on this project's 2-core CPU
machine (a plain ``torch.autograd.Function`` costs about 4 us; both measured with no-op launchers),
and an mHC layer makes four such calls per connection. So eager code calls the launchers through a
Function built from the same context and backward helpers, and code being compiled calls the op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def eager_function(forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``Function.apply`` running ``forward`` directly, with ``register_autograd``-style helpers;
    with grad mode off (no graph to record) ``forward`` alone, without ``apply``'s machinery: the
    recomputed and fused-backward connections call the kernels inside their own Functions'
    forwards, where grad mode is off, and so do ``torch.no_grad`` callers (prediction)."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        @once_differentiable  # the kernels' gradients are not differentiable: raise, not drop
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Eager.__name__ = f"Eager_{getattr(forward, '__name__', 'kernel')}"
    apply = Eager.apply

    def call(*inputs):
        return apply(*inputs) if torch.is_grad_enabled() else forward(*inputs)

    return call


def compiled_or_eager(op: Callable, eager: Callable) -> Callable:
    """Call ``op`` while torch.compile traces, ``eager`` otherwise."""

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager(*args)

    return call


def save_inputs(ctx, inputs, output) -> None:
    """The setup of a kernel pair whose backward needs every input and nothing else."""
    ctx.save_for_backward(*inputs)


def backward_from_saved(bwd: Callable) -> Callable:
    """The backward of a kernel pair set up by :func:`save_inputs` with one output:
    ``bwd(*inputs, grad)``."""

    def backward(ctx, grad):
        return bwd(*ctx.saved_tensors, grad.contiguous())

    return backward


def differentiable(op, bwd_op, forward: Callable, bwd: Callable, setup_context: Callable,
                   backward_with: Callable) -> Callable:  # fmt: skip
    """Both front doors of one kernel pair: registers ``backward_with(bwd_op)`` as the custom op's
    autograd and returns the caller, ``op`` under torch.compile and otherwise a Function running
    ``forward`` and ``backward_with(bwd)`` (the launchers themselves)."""
    op.register_autograd(backward_with(bwd_op), setup_context=setup_context)
    return compiled_or_eager(op, eager_function(forward, setup_context, backward_with(bwd)))
