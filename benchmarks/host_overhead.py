"""Host (Python + dispatch) time of one MHCLayer forward+backward, kernels replaced by no-ops.

    python benchmarks/host_overhead.py

A small mHC layer is dispatch-bound on a GPU (profile_layer.py: about twice as much host time as
GPU time per block), so the host cost of the Triton path matters by itself. This script measures it
on any machine: under ``TRITON_INTERPRET=1`` every Triton kernel launch is replaced by a no-op, so
what remains is the Python, autograd and launcher work around the kernels (tiny tensors: 2 x 4
tokens, n = 4, C = 8). It times four paths, median of 5 repeats of 400 steps each:
the PyTorch reference (real ops), the Triton path through ``torch.library`` custom ops with the
coefficient epilogue in PyTorch and Sinkhorn as its own kernel (how the GPU runs of 2026-11-26
ran), the eager autograd Functions with that split, and the eager Functions with the fused epilogue
(scale, bias, gates and Sinkhorn in one kernel each way; opt-in).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

import mhc_kernels.layer as layer_module  # noqa: E402
from mhc_kernels import MHCLayer, sinkhorn_knopp  # noqa: E402
from mhc_kernels.coefficients import epilogue  # noqa: E402


def no_launch(self, grid):
    return lambda *args, **kwargs: None


def time_steps(layer, x, compiling: bool = False, steps: int = 400, repeats: int = 5) -> float:
    """Median seconds per forward+backward; ``compiling`` routes calls to the custom ops."""
    real = torch.compiler.is_compiling
    torch.compiler.is_compiling = (lambda: True) if compiling else real
    try:

        def step():
            torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])

        for _ in range(50):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - start) / steps)
        return statistics.median(times)
    finally:
        torch.compiler.is_compiling = real


def split_epilogue(proj, ss, alpha, bias, n, features, rms_eps, backend, sinkhorn):
    """The epilogue in PyTorch, then Sinkhorn's own kernel."""
    pre, post, logits = epilogue(proj, ss, alpha, bias, n, features, rms_eps, "torch")
    iters, order, eps = sinkhorn
    return pre, post, sinkhorn_knopp(logits, iters, order=order, eps=eps, backend=backend)


def main() -> None:
    interpreter.InterpretedFunction.__getitem__ = no_launch
    torch.manual_seed(0)
    branch = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 4, 8, requires_grad=True)
    rows = [("PyTorch reference (real ops)", "torch", epilogue, False)]
    rows += [("Triton via custom ops, split epilogue", "triton", split_epilogue, True)]
    rows += [("Triton via eager Functions, split epilogue", "triton", split_epilogue, False)]
    rows += [("Triton via eager Functions, fused epilogue", "triton", epilogue, False)]
    for label, backend, layer_epilogue, compiling in rows:
        layer_module.epilogue = layer_epilogue
        seconds = time_steps(MHCLayer(branch, 8, 4, backend=backend), x, compiling)
        print(f"{label:48s} {seconds * 1e6:8.0f} us per forward+backward")
    layer_module.epilogue = epilogue


if __name__ == "__main__":
    main()
