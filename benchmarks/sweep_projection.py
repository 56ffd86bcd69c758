"""Sweep the Triton coefficient projection's launch parameters on a GPU: tiles, warps and split.

    python benchmarks/sweep_projection.py [--tokens 4096] [--C 1488] [--n 4]
                                          [--dtypes bf16 fp32] [--kernels fwd dphi dv] [--out FILE]

The projection's kernels (forward ``v @ phi`` with ``sum(v^2)``, ``dphi = v^T @ dproj`` and
``dv = dproj @ phi^T + 2 v dss``) ran 6-9x their memory roofline on an H200 at the layer's 4,096
tokens (third lease of 2026-11-27), and with every fused kernel and the fused backward they were
44% of the GPU time that mHC added to the block (the profile). Their tiles, 16 tokens x 32 K
columns, were sized for float32 FMA dots and kept for the tensor-core form: every 16 tokens re-read
phi's K x W floats (the forward, dv), every 32 columns the gradient's T x W (dphi).

This times every combination of tokens per program (BT), K columns per step (BK), warps and the
programs per SM that the split of each reduction aims at (for the float32 forward also with
float32 FMAs instead of tensor cores), through the shipped launchers
(``GPU_TILES`` set to each in turn, so the partial sums and their addition are timed too), checks
every result against float64, and prints the fastest next to the shipped choice, with the roofline
ratio (unavoidable bytes: the streams read once, dv also written once, at the GPU's peak DRAM
bandwidth). Kernels in the order that matters most (the forward and dphi are what the fused
backward runs; bf16 streams are st_finetune's under bf16 mixed precision); the rows found so far
are written after every kernel, so a run cut short keeps them.

Without a GPU it runs under ``TRITON_INTERPRET=1`` (benchmarks/conftest.py sets it) at whatever
size it is given: a check of the script and of every configuration's results; its times mean
nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
from conftest import peak_bandwidth_gbs, write_rows  # beside this script (sets TRITON_INTERPRET)

from mhc_kernels.coefficients import triton as ct

KERNELS = ("fwd", "dphi", "dv")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BLOCKS_T, BLOCKS_K, WARPS, PER_SM = (16, 32, 64, 128), (32, 64, 128), (4, 8), (2, 4, 8)
MAX_ELEMS_PER_THREAD = 64  # a [BT, BK] tile of more per thread spilled (ptxas -v, sm_90)
# float32 FMAs instead of tensor cores: for the float32 forward only, the one kernel where that
# form was faster (third lease, 16,384 tokens: 0.41 against 0.48 ms; 2.6x slower fwd+bwd)
FMA_TOO = {("fwd", "fp32")}


def case(kernel: str, T: int, n: int, C: int, dtype: torch.dtype, device: str):
    """``(call, float64 results, tolerance, unavoidable bytes)`` for one kernel's launcher."""
    gen = torch.Generator(device=device).manual_seed(0)
    K, W = n * C, n * n + 2 * n
    v = torch.randn(T, K, device=device, generator=gen).to(dtype)
    phi = torch.randn(K, W, device=device, generator=gen) / K**0.5
    dproj = torch.randn(T, W, device=device, generator=gen)
    dss = torch.randn(T, device=device, generator=gen)
    vd, phid = v.double(), phi.double()
    stream_bytes = v.numel() * v.element_size()
    if kernel == "fwd":
        call, want = lambda: ct.projection_fwd(v, phi), (vd @ phid, (vd * vd).sum(-1))
    elif kernel == "dv":
        call = lambda: (ct.projection_dv(v, phi, dproj, dss),)  # noqa: E731
        want = (dproj.double() @ phid.T + 2 * vd * dss.double()[:, None],)
        stream_bytes *= 2
    else:
        call, want = lambda: (ct.projection_dphi(v, dproj, phi),), (vd.T @ dproj.double(),)
    # one float32 sum of K (or T) terms in any order, ~sqrt(terms) ulps; dv rounded to its dtype
    terms = T if kernel == "dphi" else K
    tolerance = 4 * terms**0.5 * 2**-24 + (torch.finfo(dtype).eps if kernel == "dv" else 0.0)
    return call, want, tolerance, stream_bytes


def relative_error(got, want) -> float:
    """The largest error of any output, relative to that output's largest magnitude."""
    pairs = zip(got, want, strict=True)
    return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in pairs)


def timer(on_gpu: bool):
    if on_gpu:
        from triton.testing import do_bench

        return lambda call: do_bench(call, warmup=5, rep=10, return_mode="median")

    def once(call):
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3

    return once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--C", type=int, default=1488)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    T, n, C = args.tokens, args.n, args.C
    if ct.dot_width(n * n + 2 * n) > ct.SWEPT_COLUMNS:
        parser.error(f"GPU_TILES serve n <= 4 (W padded to <= {ct.SWEPT_COLUMNS} columns)")
    on_gpu = torch.cuda.is_available()
    device, peak = ("cuda", peak_bandwidth_gbs()) if on_gpu else ("cpu", None)
    if not on_gpu:
        ct.interpreting = lambda: False  # the GPU's tiles (the interpreter's bf16-dot fix stays)
    bench = timer(on_gpu)
    rows = []
    for name, kernel in itertools.product(args.dtypes, args.kernels):
        dtype = DTYPES[name]
        key = (kernel, dtype.itemsize)
        shipped = ct.GPU_TILES[key]
        call, want, tolerance, nbytes = case(kernel, T, n, C, dtype, device)
        found = []
        forms = (True, False) if (kernel, name) in FMA_TOO else (True,)
        for tiles in itertools.starmap(ct.Tiles, itertools.product(BLOCKS_T, BLOCKS_K, WARPS,
                                                                    PER_SM, forms)):  # fmt: skip
            if tiles.BT * tiles.BK // (32 * tiles.warps) > MAX_ELEMS_PER_THREAD:
                continue
            ct.GPU_TILES[key] = tiles
            try:
                error = relative_error(call(), want)
                ms = bench(call)
            except Exception as failure:  # a configuration that fails to compile or launch
                print(f"skip {kernel} {name} {tiles}: {type(failure).__name__}", file=sys.stderr)
                continue
            finally:
                ct.GPU_TILES[key] = shipped
            found.append({"kernel": kernel, "dtype": name, "tokens": T, "n": n, "C": C,
                          **tiles._asdict(), "ms": ms,
                          "roofline_ratio": ms / (nbytes / (peak * 1e9) * 1e3) if peak else None,
                          "relative_error": error, "accurate": error <= tolerance,
                          "shipped": tiles == shipped})  # fmt: skip
        found.sort(key=lambda r: (not r["accurate"], r["ms"]))
        for r in found[:5] + [r for r in found[5:] if r["shipped"] or not r["accurate"]]:
            print(json.dumps(r), flush=True)
        rows += found
        write_rows(args.out, rows)
    inaccurate = [r for r in rows if not r["accurate"]]
    if inaccurate:
        print(f"{len(inaccurate)} configurations beyond float32's tolerance", file=sys.stderr)
    return 1 if inaccurate else 0


if __name__ == "__main__":
    sys.exit(main())
