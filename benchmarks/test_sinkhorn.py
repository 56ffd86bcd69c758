"""Sinkhorn-Knopp speed: eager reference, naive autograd, torch.compile(reference) and Triton.

Every row records the device, versions, the median of one synchronised call, effective GB/s
(unavoidable traffic / time) and, on a GPU, the time per call back to back (which sets the GB/s)
and, with a known peak, the ratio to the memory roofline. `summarize.py` turns a
``--benchmark-json`` file into the speed-ups and targets of issue 2.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, ON_GPU, timed

from mhc_kernels import sinkhorn_knopp
from mhc_kernels.sinkhorn.reference import sinkhorn_knopp_reference

ITERS = 20
BATCH_EXPONENTS = (10, 14, 18, 20, 22) if ON_GPU else (10, 14)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_autograd(x, iters=ITERS, eps=1e-12):
    """What a user writes first: autograd straight through the loop (keeps every iterate)."""
    a = torch.exp(x - x.detach().amax(dim=-2, keepdim=True))
    for _ in range(iters):
        a = a / (a.sum(dim=-2, keepdim=True) + eps)
        a = a / (a.sum(dim=-1, keepdim=True) + eps)
    return a


@functools.cache
def compiled_reference():
    return torch.compile(sinkhorn_knopp_reference, dynamic=True)


def provider_fn(provider):
    if provider == "eager":
        return lambda x: sinkhorn_knopp(x, ITERS, backend="torch")
    if provider == "naive":
        return lambda x: naive_autograd(x.float()).to(x.dtype)
    if provider == "compile":
        return lambda x: compiled_reference()(x, ITERS)
    return lambda x: sinkhorn_knopp(x, ITERS, backend="triton")


def skip_reason(provider, exponent, n):
    if provider in ("compile", "triton") and not ON_GPU:
        return f"{provider} is a GPU provider (CPU: Triton runs only under its interpreter)"
    if provider == "naive" and exponent > 20:
        return "naive autograd keeps 2*iters matrices per input: skipped at this size"
    if provider == "compile" and (exponent, n) != (20, 4):
        return "torch.compile is measured at n = 4, 2^20 only (each compile costs ~20 s)"
    return None


def traffic_bytes(batch, n, dtype, passes):
    element = torch.finfo(dtype).bits // 8
    matrices = 2 if passes == "fwd" else 5  # fwd: X, P; bwd adds X, dL/dP, dL/dX
    return matrices * batch * n * n * element


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [4, 8], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("exponent", BATCH_EXPONENTS, ids=lambda e: f"B2^{e}")
@pytest.mark.parametrize("provider", ["eager", "naive", "compile", "triton"])
def test_sinkhorn_speed(benchmark, record, provider, exponent, n, dtype, passes):
    reason = skip_reason(provider, exponent, n)
    if reason:
        pytest.skip(reason)
    batch = 2**exponent
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (2 * torch.randn(batch, n, n, device=DEVICE, generator=gen)).to(DTYPES[dtype])
    upstream = None
    if passes == "fwd+bwd":
        upstream = torch.randn(batch, n, n, device=DEVICE, generator=gen).to(x.dtype)
    nbytes = traffic_bytes(batch, n, DTYPES[dtype], passes)
    run, facts = timed(benchmark, provider_fn(provider), [x], upstream, passes, nbytes)
    facts |= {"provider": provider, "batch": batch, "n": n, "dtype": dtype, "passes": passes}
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        facts["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - base
    record(**facts)


def saved_bytes(fn, x):
    """Bytes of tensors saved for backward by ``fn(x)`` (memory held from forward to backward)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


@pytest.mark.parametrize("n", [4, 8], ids=lambda n: f"n{n}")
def test_reference_memory_vs_naive(benchmark, record, n):
    """Issue 2, CPU target: the recompute backward holds >= 5x less memory than naive autograd."""
    x = torch.randn(4096, n, n, device=DEVICE, requires_grad=True)
    ours = benchmark.pedantic(
        lambda: saved_bytes(lambda t: sinkhorn_knopp(t, ITERS, backend="torch"), x), rounds=1
    )
    naive = saved_bytes(naive_autograd, x)
    record(n=n, saved_bytes_reference=ours, saved_bytes_naive=naive, ratio=naive / ours)
    assert naive / ours >= 5
