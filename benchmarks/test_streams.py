"""mHC layer kernels (issue 8): coefficient projection, coefficient epilogue (with Sinkhorn), pre-mix
and post/residual merge, fused Triton vs unfused PyTorch vs torch.compile, forward and
forward+backward, with effective GB/s.

Traffic counted per token (bytes of the stream dtype; fp32 coefficients not counted):
projection fwd n*C (fwd+bwd 3 n*C), pre-mix fwd n*C + C, merge fwd (n + 1)*C + n*C; fwd+bwd adds
the backward's unavoidable reads and writes. Target (GPU): each within 1.3x of its roofline.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, ON_GPU, timed

from mhc_kernels.coefficients import epilogue, projection
from mhc_kernels.coefficients.reference import epilogue_reference, projection_reference
from mhc_kernels.sinkhorn import sinkhorn_knopp
from mhc_kernels.sinkhorn.reference import sinkhorn_knopp_reference
from mhc_kernels.streams import merge, pre_mix
from mhc_kernels.streams.reference import merge_reference, pre_mix_reference

REFERENCES = {"pre_mix": pre_mix_reference, "merge": merge_reference,
              "projection": projection_reference}  # fmt: skip
FUSED = {"pre_mix": pre_mix, "merge": merge, "projection": projection}

N, C = 4, 1488
TOKENS = (16 * 256, 64 * 256) if ON_GPU else (256,)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@functools.cache
def compiled(name):
    return torch.compile(REFERENCES[name])


def traffic(kernel: str, passes: str, tokens: int, element: int) -> int:
    per_token = {("pre_mix", "fwd"): N * C + C, ("merge", "fwd"): (N + 1) * C + N * C,
                 ("pre_mix", "fwd+bwd"): (N * C + C) + (N * C + C + N * C),
                 ("merge", "fwd+bwd"): (2 * N + 1) * C + (2 * N + 1) * C + (N + 1) * C,
                 ("projection", "fwd"): N * C, ("projection", "fwd+bwd"): 3 * N * C}  # fmt: skip
    return per_token[(kernel, passes)] * tokens * element


def measure(benchmark, record, fn, inputs, upstream, passes, nbytes, **facts):
    """Time ``fn`` (conftest.timed) and record ``facts`` with the effective GB/s for ``nbytes``
    and the roofline ratio."""
    _, timing = timed(benchmark, fn, inputs, upstream, passes, nbytes)
    record(**facts, passes=passes, n=N, C=C, **timing)


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("kernel", ["projection", "pre_mix", "merge"])
@pytest.mark.parametrize("provider", ["eager", "compile", "triton", "triton_fma"])
def test_stream_kernel_speed(benchmark, record, provider, kernel, tokens, dtype, passes,
                             monkeypatch):  # fmt: skip
    """``triton_fma``: the projection's products as float32 FMAs instead of on bf16 tensor cores
    (operands split in three bf16 parts: ``mhc_kernels._split_dot.dot_f32``)."""
    if provider != "eager" and not ON_GPU:
        pytest.skip(f"{provider} is a GPU provider")
    if provider == "triton_fma":
        if kernel != "projection":
            pytest.skip("only the projection has the FMA alternative")
        from mhc_kernels.coefficients import triton as kernels

        monkeypatch.setattr(kernels, "TENSOR_CORES", False)
    if provider == "compile" and (dtype, tokens) != ("fp32", TOKENS[0]):
        pytest.skip("torch.compile is measured for fp32 at the smaller size only (compile time)")
    dt = DTYPES[dtype]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(tokens, N, C, device=DEVICE, generator=gen).to(dt)
    y = torch.randn(tokens, C, device=DEVICE, generator=gen).to(dt)
    h = torch.rand(tokens, N, device=DEVICE, generator=gen)
    h_res = torch.rand(tokens, N, N, device=DEVICE, generator=gen)
    phi = torch.randn(N * C, N * N + 2 * N, device=DEVICE, generator=gen) / (N * C) ** 0.5
    inputs = {"pre_mix": [x, h], "merge": [x, y, h, h_res],
              "projection": [x.reshape(tokens, N * C), phi]}[kernel]  # fmt: skip
    if provider == "compile":
        fn = compiled(kernel)
    else:
        backend = "triton" if provider.startswith("triton") else "torch"
        fn = functools.partial(FUSED[kernel], backend=backend)
    if kernel == "projection":
        inner = fn

        def fn(*args):  # one tensor to differentiate: proj and sumsq together
            proj, ss = inner(*args)
            return torch.cat([proj, ss.unsqueeze(-1)], dim=-1)

    out_shape = {"pre_mix": (tokens, C), "merge": (tokens, N, C),
                 "projection": (tokens, N * N + 2 * N + 1)}[kernel]  # fmt: skip
    upstream = torch.randn(out_shape, device=DEVICE, generator=gen)
    upstream = upstream if kernel == "projection" else upstream.to(dt)
    nbytes = traffic(kernel, passes, tokens, torch.finfo(dt).bits // 8)
    measure(benchmark, record, fn, inputs, upstream, passes, nbytes, provider=provider,
            kernel=kernel, tokens=tokens, dtype=dtype)  # fmt: skip


def _front_door_epilogue(proj, ss, alpha, bias, sinkhorn, backend):
    return epilogue(proj, ss, alpha, bias, N, N * C, 1e-6, backend, sinkhorn)


def _split_epilogue(proj, ss, alpha, bias, sinkhorn):
    """The PyTorch formula, then Sinkhorn's own kernel (``auto`` on a GPU before the fused
    epilogue was measured)."""
    pre, post, res = epilogue_reference(proj, ss, alpha, bias, N, N * C, 1e-6)
    iters, order, eps = sinkhorn
    return pre, post, sinkhorn_knopp(res.unflatten(-1, (N, N)), iters, order=order, eps=eps)


def _reference_epilogue(proj, ss, alpha, bias):
    pre, post, res = epilogue_reference(proj, ss, alpha, bias, N, N * C, 1e-6)
    return pre, post, sinkhorn_knopp_reference(res.unflatten(-1, (N, N)), 20)


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("provider", ["eager", "split", "compile", "triton"])
def test_coefficient_epilogue_speed(benchmark, record, provider, tokens, passes):
    """Scale, bias, gates and Sinkhorn (20 iterations) from the projection, float32: all in
    PyTorch (``eager``), PyTorch then Sinkhorn's kernel (``split``: the layer's path on a GPU
    until the H200 run of 2026-11-27), ``torch.compile`` of the references, and the fused kernel
    (``triton``; ``auto`` on a GPU since that run). Traffic: the fwd reads W + 1 and writes W
    floats per token; the bwd reads 2 W + 1 and writes W + 1 more."""
    if provider != "eager" and not ON_GPU:
        pytest.skip(f"{provider} is a GPU provider")
    if provider == "compile" and tokens != TOKENS[0]:
        pytest.skip("torch.compile is measured at the smaller size only (compile time)")
    W = N * N + 2 * N
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    proj = torch.randn(tokens, W, device=DEVICE, generator=gen)
    ss = (torch.rand(tokens, device=DEVICE, generator=gen) + 0.5) * N * C
    alpha = torch.rand(3, device=DEVICE, generator=gen)
    bias = torch.randn(W, device=DEVICE, generator=gen)
    inputs = [proj, ss, alpha, bias]
    sinkhorn = (20, "col_row", 1e-12)
    fn = {"eager": functools.partial(_front_door_epilogue, sinkhorn=sinkhorn, backend="torch"),
          "split": functools.partial(_split_epilogue, sinkhorn=sinkhorn),
          "compile": torch.compile(_reference_epilogue),
          "triton": functools.partial(_front_door_epilogue, sinkhorn=sinkhorn, backend="triton"),
          }[provider]  # fmt: skip
    upstream = [torch.randn(tokens, N, device=DEVICE, generator=gen),
                torch.randn(tokens, N, device=DEVICE, generator=gen),
                torch.randn(tokens, N, N, device=DEVICE, generator=gen)]  # fmt: skip
    floats = (2 * W + 1) if passes == "fwd" else (2 * W + 1) + (3 * W + 2)
    measure(benchmark, record, fn, inputs, upstream, passes, floats * tokens * 4,
            provider=provider, kernel="epilogue", tokens=tokens, dtype="fp32")  # fmt: skip


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
def test_stream_grad_speed(benchmark, record, provider, tokens, dtype):
    """The fused connection backward's stream gradient (``fused_backward``): the pre-mix's, the
    merge's and the projection's terms written once (PyTorch: one addmm, terms added in place;
    ``compile``: that under torch.compile). Traffic per token: reads x, the merge's upstream
    gradient (n C each) and the pre-mix's (C), writes n C: (3 n + 1) C elements."""
    from mhc_kernels.streams import stream_grad, stream_grad_reference

    if provider != "eager" and not ON_GPU:
        pytest.skip(f"{provider} is a GPU provider")
    if provider == "compile" and (dtype, tokens) != ("fp32", TOKENS[0]):
        pytest.skip("torch.compile is measured for fp32 at the smaller size only (compile time)")
    dt, W = DTYPES[dtype], N * N + 2 * N
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def draw(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)

    inputs = [draw(tokens, N, C, dtype=dt), draw(tokens, C, dtype=dt), draw(tokens, N, C, dtype=dt),
              draw(tokens, N).sigmoid(), draw(tokens, N, N).softmax(-1), draw(tokens),
              draw(tokens, W), draw(N * C, W) / (N * C) ** 0.5]  # fmt: skip
    if provider == "compile":
        fn = torch.compile(stream_grad_reference)
    else:
        fn = functools.partial(stream_grad, backend="triton" if provider == "triton" else "torch")
    nbytes = (3 * N + 1) * C * tokens * torch.finfo(dt).bits // 8
    measure(benchmark, record, fn, inputs, None, "fwd", nbytes, provider=provider,
            kernel="stream_grad", tokens=tokens, dtype=dtype)  # fmt: skip
