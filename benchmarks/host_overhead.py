"""Host (Python + dispatch) time of one MHCLayer forward+backward, kernels replaced by no-ops.

    python benchmarks/host_overhead.py [rounds]

A small mHC layer is dispatch-bound on a GPU (profile_layer.py: about twice as much host time as
GPU time per block), so the host cost of the Triton path matters by itself. This script measures it
on any machine: under ``TRITON_INTERPRET=1`` every Triton kernel launch is replaced by a no-op, so
what remains is the Python, autograd and launcher work around the kernels (tiny tensors: 2 x 4
tokens, n = 4, C = 8), and ``backend="auto"`` picks what it picks on a GPU (the Sinkhorn, stream
and, since the H200 run of 2026-11-27, fused coefficient-epilogue kernels; the projection in
PyTorch at this width: from n*C >= 4096, as in ST-Tahoe's blocks, ``auto`` also takes the Triton
projection, the ``backend="triton"`` path below). Paths: the PyTorch reference (real ops),
``auto`` through the ``torch.library`` custom ops (what torch.compile calls; the GPU runs of
2026-11-26 ran this way in eager mode too), ``auto``
through the eager autograd Functions alone and with the fused backward or recomputation, and every
fused kernel (``backend="triton"``: the projection too) alone and with the fused backward. The
paths take turns, 100 steps each per round (this machine's run-to-run spread is about 30%); median
and best round per path.
Then, per path, what one forward+backward asks of the host, counted (counts do not vary between
runs, so they show a change that the times' spread hides): aten calls, those that make GPU work
(not views or allocations), Triton launches and autograd nodes.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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


LAUNCHES = collections.Counter()  # Triton launches by kernel (counted, not run)

# aten operations that make no GPU work: views, metadata and allocations
NO_GPU_WORK = {"view", "_unsafe_view", "_reshape_alias", "as_strided", "expand", "permute", "t",
               "transpose", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes",
               "unbind", "alias", "detach", "diagonal", "lift_fresh", "empty", "empty_like",
               "empty_strided"}  # fmt: skip


def no_launch(self, grid):
    def launch(*args, **kwargs):
        LAUNCHES[self.fn.__name__] += 1

    return launch


class CountOps(TorchDispatchMode):
    """aten operations by name, as dispatched (each a host-side call; most launch GPU work)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def host_work(step) -> dict[str, int]:
    """What one forward+backward asks of the host: aten calls, those that make GPU work, Triton
    launches and autograd nodes. Counts, unlike times, do not vary between runs."""
    LAUNCHES.clear()
    with CountOps() as counted:
        nodes = step()
    ops = counted.ops
    gpu = sum(k for name, k in ops.items() if name not in NO_GPU_WORK)
    return {"aten": sum(ops.values()), "gpu_ops": gpu, "triton": sum(LAUNCHES.values()),
            "nodes": nodes}  # fmt: skip


def graph_nodes(out: torch.Tensor) -> int:
    """Autograd nodes reachable from ``out`` (each one the backward pass walks)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


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
            loss = layer(x).sum()
            torch.autograd.grad(loss, params)
        finally:
            torch.compiler.is_compiling = real
        return graph_nodes(loss)

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
    print(
        "\nper forward+backward: aten calls, of which make GPU work, Triton launches, autograd nodes"
    )
    for label, step in runs.items():
        work = host_work(step)
        print(f"{label:40s} {work['aten']:4d} {work['gpu_ops']:4d} {work['triton']:4d} "
              f"{work['nodes']:4d}")  # fmt: skip


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
