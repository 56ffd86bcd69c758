"""Triton kernels against the reference (interpreter on CPU, native on a GPU) and GPU compile checks.

Tolerances come from the reference itself: the kernel's error against the float64 reference may be at
most a small multiple of the float32 reference's own error against float64 (plus the output dtype's
rounding for low-precision input).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from mhc_kernels import sinkhorn_knopp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(x, iters, order, backend, grad):
    x = x.detach().requires_grad_()
    out = sinkhorn_knopp(x, iters, order=order, backend=backend)
    (dx,) = torch.autograd.grad(out, x, grad.to(out.dtype))
    return out.double(), dx.double()


def assert_matches_reference(x, iters, order="col_row", seed=0):
    """Kernel vs float64 reference, bounded by the float32/low-precision reference's own error."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    grad = torch.randn(x.shape, generator=gen, device=x.device)
    out, dx = run(x, iters, order, "triton", grad)
    out_ref, dx_ref = run(x, iters, order, "torch", grad)  # same dtype as the kernel
    out64, dx64 = run(x.double(), iters, order, "torch", grad.double())
    for name, got, ref, exact in (("output", out, out_ref, out64), ("grad", dx, dx_ref, dx64)):
        scale = exact.abs().max().clamp_min(1e-30)
        ref_err = (ref - exact).abs().max()
        got_err = (got - exact).abs().max()
        bound = 4 * ref_err + 1e-6 * scale
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        assert got_err <= bound, f"{name}: error {got_err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("iters", [1, 3, 20], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16], ids=lambda n: f"n{n}")
def test_matches_reference_fp32(n, iters, device):
    x = torch.randn(300, n, n, device=device) * 2
    assert_matches_reference(x, iters)


@pytest.mark.parametrize("sigma", [0.5, 2, 8], ids=lambda s: f"sigma{s}")
@pytest.mark.parametrize("order", ["col_row", "row_col"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_matches_reference_dtypes_orders_scales(dtype, order, sigma, device):
    x = (torch.randn(513, 4, 4, device=device) * sigma).to(DTYPES[dtype])
    assert_matches_reference(x, 20, order)


@pytest.mark.parametrize(
    "batch,n", [(1000, 16), (2500, 8), (7, 4)], ids=["B1000-n16", "B2500-n8", "B7-n4"]
)
def test_batches_not_divisible_by_the_block(batch, n, device):
    # under the interpreter n=16 -> 256 matrices per block, n=8 -> 1024: several blocks per program
    x = torch.randn(batch, n, n, device=device) * 3
    assert_matches_reference(x, 20)


def test_leading_batch_shape_and_strided_input(device):
    base = torch.randn(6, 5, 4, 4, device=device).transpose(0, 1)[:, ::2]  # (5, 3, 4, 4), strided
    assert not base.is_contiguous()
    assert_matches_reference(base, 20)
    grad = torch.randn(4, 4, 5, device=device).permute(2, 0, 1)  # strided upstream gradient
    x = torch.randn(5, 4, 4, device=device).requires_grad_()
    (dx,) = torch.autograd.grad(sinkhorn_knopp(x, backend="triton"), x, grad)
    (dx_ref,) = torch.autograd.grad(sinkhorn_knopp(x, backend="torch"), x, grad)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-6)


def test_extreme_masked_and_nan_inputs_follow_the_reference(device):
    x = (torch.rand(64, 4, 4, device=device) * 2 - 1) * 1e4
    x[0, 1, :] = float("-inf")
    x[1, 2, 3] = float("nan")
    x.requires_grad_()
    grad = torch.randn_like(x)
    out = sinkhorn_knopp(x, backend="triton")
    (dx,) = torch.autograd.grad(out, x, grad)
    out_ref = sinkhorn_knopp(x, backend="torch")
    (dx_ref,) = torch.autograd.grad(out_ref, x, grad)
    assert torch.isnan(out[1]).all()
    keep = torch.ones(64, dtype=torch.bool)
    keep[1] = False
    assert torch.isfinite(out[keep]).all() and (out[keep] >= 0).all()
    assert torch.isfinite(dx[keep]).all()
    torch.testing.assert_close(out[keep], out_ref[keep], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dx[keep], dx_ref[keep], rtol=1e-4, atol=1e-5)


def test_empty_batch(device):
    x = torch.randn(0, 4, 4, device=device, requires_grad=True)
    out = sinkhorn_knopp(x, backend="triton")
    assert out.shape == (0, 4, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4, 4)


@pytest.mark.parametrize(
    "n,strided",
    [(1, False), (2, False), (4, False), (4, True), (8, False), (3, False), (5, False)],
    ids=["n1", "n2", "n4", "n4-strided", "n8", "n3-tiles", "n5-tiles"],
)
def test_the_gpu_launches_give_the_references_results(n, strided, monkeypatch):
    # the launchers as on a GPU (interpreting() False): 128 matrices per program step by matrix
    # (n = 1, 2, 4, 8; a strided batch copied), in tiles otherwise; 300 matrices over 2 programs,
    # so a program walks several tiles and reuses its scratch slot
    import mhc_kernels.sinkhorn.triton as sk

    if not sk.interpreting():
        pytest.skip("on a GPU every test runs the GPU launches")
    monkeypatch.setattr(sk, "interpreting", lambda: False)
    x = torch.randn(300, n, n) * 3
    if strided:
        x = x.transpose(-1, -2)
    assert sk.by_matrix(n) == (n not in (3, 5))
    if sk.by_matrix(n):
        consts, programs = sk._by_matrix_launch(x.shape[0], n, x.device)
        assert consts["BLOCK"] == sk.BY_MATRIX_TILE and programs == 2
    else:  # tiles of 2048 elements: 128 matrices padded to 4 x 4, or 32 padded to 8 x 8
        block, np2, programs = sk.launch_config(x.shape[0], n, x.device)
        assert block == sk.GPU_TILE_ELEMS // np2**2 and programs == 2
    assert_matches_reference(x, 3)


def test_the_compile_check_finds_tensor_core_products_in_flight_across_a_loops_back_edge():
    """``wgmma_in_flight``: a loop whose last ``wgmma`` group is committed and not waited for
    before the branch back; groups waited for, or waited for after the loop, do not count."""
    from mhc_kernels.compile_check import _wgmma_in_flight

    def loop(*body):
        return "\n".join(["$L__BB0_2:  // =>This Inner Loop Header: Depth=1", *body,
                          "@%p5 bra $L__BB0_2;", "$L__BB0_3:", "wgmma.wait_group.sync.aligned 0;"])  # fmt: skip

    mma = ["wgmma.fence.sync.aligned;", "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 ..;",
           "wgmma.commit_group.sync.aligned;"]  # fmt: skip
    wait = ["wgmma.wait_group.sync.aligned 0;"]
    copy = ["cp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;"]
    assert _wgmma_in_flight(loop(*mma, *wait, *mma, *copy)) == 1
    assert _wgmma_in_flight(loop(*mma, *wait, *mma, *wait, *copy)) == 0
    assert _wgmma_in_flight(loop(*copy)) == 0
    assert _wgmma_in_flight("\n".join([*mma, "bra $L__BB0_9;", "$L__BB0_9:", *wait])) == 0


def test_the_compile_check_tells_safe_products_in_flight_from_racy_ones():
    """``in_flight_safe``: products left in flight are safe only with both operands in shared
    memory, a buffer per stage in every pipelined allocation, nothing stored from registers and
    the loop's copies after its first wait (the two forms that raced on the H200: v's tile with
    a buffer fewer than the stages, and an A operand in registers)."""
    from mhc_kernels.compile_check import _in_flight_safe

    def ttgir(buffers=(3, 3), a="!ttg.memdesc<128x16xbf16, #shared, #smem, mutable>", extra=""):
        allocs = [f"%{i} = ttg.local_alloc : () -> !ttg.memdesc<{b}x128x16xbf16, #shared, #smem, "
                  "mutable> loc(#loc1)" for i, b in enumerate(buffers)]  # fmt: skip
        dot = (f"%acc = ttng.warp_group_dot %v, %b, %c {{inputPrecision = 0 : i32, isAsync = true}}"
               f" : {a} * !ttg.memdesc<16x32xbf16, #shared1, #smem, mutable> -> "
               "tensor<128x32xf32, #mma> loc(#loc2)")  # fmt: skip
        return "\n".join([*allocs, dot, extra])

    def ptx(*body):
        return "\n".join(["$L__BB0_2:", *body, "@%p5 bra $L__BB0_2;"])

    mma = ["wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 ..;",
           "wgmma.commit_group.sync.aligned;"]  # fmt: skip
    wait = ["wgmma.wait_group.sync.aligned 0;"]
    copy = ["cp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;",
            "cp.async.commit_group;"]  # fmt: skip
    loop = ptx(*mma, *wait, *mma, *copy)
    assert _in_flight_safe(loop, ttgir(), 3)
    assert not _in_flight_safe(loop, ttgir(buffers=(2, 3)), 3)  # the bf16 forward's race
    assert not _in_flight_safe(loop, ttgir(a="tensor<128x16xbf16, #ttg.dot_op<...>>"), 3)
    assert not _in_flight_safe(loop, ttgir(extra="%s = ttg.local_alloc %parts : (tensor<..>)"), 3)
    assert not _in_flight_safe(ptx(*copy, *mma, *wait, *mma), ttgir(), 3)  # copies first
    assert not _in_flight_safe(loop, ttgir(buffers=(1,)), 1)


@pytest.mark.skipif(
    sys.platform != "linux", reason="GPU compilation needs Triton's Linux toolchain"
)
def test_every_shipped_configuration_compiles_for_gpu_targets_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "mhc_kernels.compile_check", "--arch", "80", "89", "90",
         "--max-seconds", "30"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_89", "sm_90"}
    assert all(r["local"] == 0 and r["spill_bytes"] == 0 for r in rows), [
        r for r in rows if not r["ok"]
    ]
    # no loop leaves a Hopper tensor-core product reading shared memory or registers that its
    # next step overwrites (the projection's race on the H200, 2026-11-27); the only products in
    # flight are the candidates' (coefficients.triton.CANDIDATE_TILES), in shared memory alone
    assert all(r["in_flight_safe"] for r in rows), [r for r in rows if not r["in_flight_safe"]]
    assert all("candidate" in r["kernel"] for r in rows if r["wgmma_in_flight"])
    assert max(r["compile_s"] for r in rows) < 30
    # the stream kernels (one dtype) keep sums over streams in a thread's registers: no barriers
    # in the forwards, the 16-bit backwards synchronise no more than the fp32 ones (their sums
    # over channels), and stream rows load 16 bytes per thread; the forwards and the stream
    # gradient issue every load before their stores
    streams = {}  # (kind, padded n, arch, dtype) -> row, names "kind-NPk-BTb-BCc-dtype"
    for r in rows:
        if r["kernel"].startswith(("pre_mix", "merge")) and "-y" not in r["kernel"]:
            kind, np2, *_, dtype = r["kernel"].split("-")
            streams[(kind, np2, r["arch"], dtype)] = r
    # 6 kinds: pre_mix_fwd/bwd/dh, merge_fwd/bwd/bwd_nodx
    assert len(streams) == 6 * 4 * 3 * 3
    assert all(r["loads_v2"] == 0 and r["loads_v4"] > 0 for r in streams.values())
    for (kind, np2, arch, _), r in streams.items():
        if kind.endswith("_fwd"):
            assert r["barriers"] == 0 and r["loads_after_store"] == 0, r
        else:
            assert r["barriers"] <= streams[(kind, np2, arch, "fp32")]["barriers"], r
    grads = [r for r in rows if r["kernel"].startswith("stream_grad")]
    assert len(grads) == 4 * 3 * 3 and all(r["loads_after_store"] == 0 for r in grads)
