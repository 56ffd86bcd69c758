"""Host (Python + dispatch) time of one MHCLayer forward+backward, kernels replaced by no-ops.

    python benchmarks/host_overhead.py [rounds]

A small mHC layer is dispatch-bound on a GPU (profile_layer.py: about twice as much host time as
GPU time per block), so the host cost of the Triton path matters by itself. This script measures it
on any machine: under ``TRITON_INTERPRET=1`` every Triton kernel launch is replaced by a no-op, so
what remains is the Python, autograd and launcher work around the kernels (tiny tensors: 2 x 4
tokens, n = 4, C = 8), and ``backend="auto"`` picks what it picks on a GPU (the Sinkhorn and stream
kernels and, since the H200 run of 2026-11-27, the fused coefficient epilogue; the projection in
PyTorch). Paths: the PyTorch reference
(real ops), ``auto`` through the ``torch.library`` custom ops (what torch.compile calls; the GPU
runs of 2026-11-26 ran this way in eager mode too), ``auto`` through the eager autograd Functions
alone and with the fused backward or recomputation, and every fused kernel (``backend="triton"``:
the projection too) alone and with the fused backward. The paths take turns, 100 steps
each per round (this machine's run-to-run spread is about 30%); median and best round per path.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

import mhc_kernels.coefficients as coefficients  # noqa: E402
import mhc_kernels.sinkhorn as sinkhorn  # noqa: E402
import mhc_kernels.streams as streams  # noqa: E402
from mhc_kernels import MHCLayer  # noqa: E402

PATHS = {
    "PyTorch reference (real ops)": ({"backend": "torch"}, False),
    "auto as on a GPU, via custom ops": ({}, True),
    "auto as on a GPU, eager Functions": ({}, False),
    "  + fused backward": ({"fused_backward": True}, False),
    "  + recomputation": ({"recompute": True}, False),
    "every fused kernel (backend=triton)": ({"backend": "triton"}, False),
    "  + fused backward ": ({"backend": "triton", "fused_backward": True}, False),
}


def no_launch(self, grid):
    return lambda *args, **kwargs: None


def as_on_a_gpu(resolve):
    """``resolve_backend`` answering ``auto`` as it does for a CUDA tensor."""

    def resolve_backend(backend, device, *, auto_triton=True):
        if backend == "auto" and not os.environ.get("MHC_BACKEND"):
            return "triton" if auto_triton else "torch"
        return resolve(backend, device, auto_triton=auto_triton)

    return resolve_backend


def step_of(layer, x, compiling: bool):
    """One forward+backward; ``compiling`` routes calls to the custom ops."""
    params = [x, *layer.parameters()]

    def step():
        real = torch.compiler.is_compiling
        torch.compiler.is_compiling = (lambda: True) if compiling else real
        try:
            torch.autograd.grad(layer(x).sum(), params)
        finally:
            torch.compiler.is_compiling = real

    return step


def main(rounds: int = 15, steps: int = 100) -> None:
    interpreter.InterpretedFunction.__getitem__ = no_launch
    resolve = as_on_a_gpu(sinkhorn.resolve_backend)
    for module in (sinkhorn, streams, coefficients):
        module.resolve_backend = resolve
    torch.manual_seed(0)
    branch = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 4, 8, requires_grad=True)
    runs = {}
    for label, (options, compiling) in PATHS.items():
        runs[label] = step_of(MHCLayer(branch, 8, 4, **options), x, compiling)
        for _ in range(50):
            runs[label]()
    times = {label: [] for label in runs}
    for _ in range(rounds):
        for label, step in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[label].append((time.perf_counter() - start) / steps)
    for label, seconds in times.items():
        median, best = statistics.median(seconds) * 1e6, min(seconds) * 1e6
        print(f"{label:40s} {median:6.0f} us per forward+backward (best round {best:6.0f} us)")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
