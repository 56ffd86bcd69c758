"""Shared benchmark setup: device facts recorded with every result, timing helpers."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets CPU runs import the kernel module

# DRAM bandwidth in GB/s (FACTS.md §4 and vendor data sheets), matched against the device name.
PEAK_BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100": 1555,
    "RTX 5000 Ada": 576,
    "RTX 4090": 1008,
    "L40S": 864,
}

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def peak_bandwidth_gbs() -> float | None:
    if not ON_GPU:
        return None
    name = device_name()
    for key, value in PEAK_BANDWIDTH_GBS.items():
        if key in name:
            return float(value)
    return None


def commit() -> str:
    if os.environ.get("MHC_BENCH_COMMIT"):  # set by gpu_check.sh where the copy has no .git
        return os.environ["MHC_BENCH_COMMIT"]
    here = os.path.dirname(__file__)
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit(),
        "peak_bandwidth_gbs": peak_bandwidth_gbs(),
    }


def synchronized(fn):
    """Wrap ``fn`` so that a timed call includes the GPU work it queued."""
    if not ON_GPU:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def back_to_back_seconds(fn, calls: int = 10, repeats: int = 3) -> float:
    """GPU seconds per call of ``fn`` run ``calls`` times back to back without synchronising, as a
    training loop runs it (CUDA events; median of ``repeats``). A first call is queued before the
    start event, so the host enqueues the timed calls while the GPU is busy with it: unlike one
    synchronised call (pytest-benchmark's median), this leaves out the host's dispatch and launch
    time and the synchronisation, unless the host is the slower side, which then shows as it is.
    The H200 runs measured one synchronised call at ~80-110 us over the kernels' own time."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def throughput_facts(fn, nbytes: int, median_s: float) -> dict:
    """Effective GB/s for ``nbytes`` of unavoidable traffic and, on a GPU, the back-to-back time
    (``back_to_back_s``, which then sets the GB/s) and the ratio to the memory roofline: the
    kernels' own bandwidth, not the host's cost of one call."""
    facts = {}
    seconds = median_s
    if ON_GPU:
        seconds = facts["back_to_back_s"] = back_to_back_seconds(fn)
    facts["effective_gbs"] = nbytes / seconds / 1e9
    peak = peak_bandwidth_gbs()
    if peak:
        facts["roofline_ratio"] = seconds / (nbytes / (peak * 1e9))
    return facts


def timed(benchmark, fn, inputs, upstream, passes: str, nbytes: int, cpu_rounds: int = 3):
    """Time ``fn(*inputs)``, forward only (``passes="fwd"``, no grad) or with the gradients of
    ``inputs`` for ``upstream``: pytest-benchmark's median of single synchronised calls (20 rounds
    on a GPU, ``cpu_rounds`` on CPU, after a warm-up call for compilation, autotuning and the
    allocator), then :func:`throughput_facts`. Returns ``(run, facts)``, ``run`` being the
    unsynchronised call."""
    if passes == "fwd":

        def run():
            with torch.no_grad():
                return fn(*inputs)
    else:
        for t in inputs:
            t.requires_grad_()

        def run():
            return torch.autograd.grad(fn(*inputs), inputs, upstream)

    synced = synchronized(run)
    synced()
    benchmark.pedantic(synced, rounds=20 if ON_GPU else cpu_rounds, warmup_rounds=1)
    return run, throughput_facts(run, nbytes, benchmark.stats.stats.median)


def sweep_timer(rep: int):
    """A sweep's timer, ``call -> ms``: on a GPU the median of ``triton.testing.do_bench``
    (``rep`` ms of runs); without one, a single run under the interpreter, a check of the sweep
    script and of the launches' results whose times mean nothing."""
    if ON_GPU:
        from triton.testing import do_bench

        return lambda call: do_bench(call, warmup=5, rep=rep, return_mode="median")

    def once(call):
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3

    return once


def write_rows(path: str | None, rows: list[dict]) -> None:
    """A sweep's rows as JSON at ``path`` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


@pytest.fixture(scope="session")
def env_info() -> dict:
    return environment()


@pytest.fixture
def record(benchmark, env_info, request):
    """``record(**facts)`` stores the environment and ``facts`` in the benchmark's extra_info.

    With ``MHC_BENCH_JSONL=FILE`` each result is also appended to FILE as it is measured, so a run
    stopped part-way (gpu_check.sh caps every step) keeps what it finished.
    """

    def _record(**facts):
        benchmark.extra_info.update(env_info)
        benchmark.extra_info.update(facts)
        path = os.environ.get("MHC_BENCH_JSONL")
        if path and benchmark.stats is not None:
            row = {**benchmark.extra_info, "name": request.node.name}
            row["median_s"] = benchmark.stats.stats.median
            with open(path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    return _record
