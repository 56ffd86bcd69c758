"""Sweep the Triton coefficient projection's launch parameters on a GPU: tiles, warps, split, stages.

    python benchmarks/sweep_projection.py [--tokens 4096] [--C 1488] [--n 4] [--parts]
                                          [--dtypes bf16 fp32] [--kernels fwd dphi dv] [--out FILE]

The projection's kernels (forward ``v @ phi`` with ``sum(v^2)``, ``dphi = v^T @ dproj`` and
``dv = dproj @ phi^T + 2 v dss``) ran 6-9x their memory roofline on an H200 at the layer's 4,096
tokens (third lease of 2026-11-27) in 16 x 32 tiles sized for float32 FMA dots. This sweep's
first run (fourth lease, 161 compiles and 483 launches in 113 s) found launches 1.3-1.8x faster,
shipped since (``GPU_TILES``), still 1.8-6.3x the roofline. It had not varied how many of a
loop's loads are in flight (Triton's ``num_stages``, 3 by default), which a K loop of ~90 steps
with a small dot per step may depend on: the fastest ``RESTAGED`` launches of each kernel are
now also timed with each of ``STAGES`` (96 more compiles). ``--parts`` sweeps the kernels on
tensor cores with their float32 operand split into its bf16 parts once per call (``Tiles.parts``:
phi for the forward and ``dv``, the gradient dproj for ``dphi``) instead, next to the shipped
launch: 69 launches per kernel and dtype (``dphi``: 84, with 256 K columns too), then the
restaged ones. The forward's tiles of ``WGMMA_TOKENS`` or more take its sum of squares apart
(``Tiles.sumsq_apart``): in the fifth H200 lease, 20 of their 49 launches without it summed 2-8%
wrong.

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

import torch

# beside this script; it sets TRITON_INTERPRET without a GPU
from conftest import ON_GPU, peak_bandwidth_gbs, sweep_timer, write_rows

from mhc_kernels.coefficients import triton as ct

KERNELS = ("fwd", "dphi", "dv")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BLOCKS_T, BLOCKS_K, WARPS, PER_SM = (16, 32, 64, 128), (32, 64, 128), (4, 8), (2, 4, 8)
# dphi's K columns per program also 256: its fastest launches were the widest swept (bf16: 64 us at
# 128 against 97 at 64, fourth lease), and at 256 it compiles without spills (sm_90, Triton 3.6:
# 58-112 registers with dproj's parts)
DPHI_BLOCKS_K = (*BLOCKS_K, 256)
# then each kernel's fastest launches again with fewer or more of the loop's loads in flight than
# Triton's default of 3 (num_stages; never varied before the fourth H200 lease)
STAGES, RESTAGED = (1, 2, 4, 5), 4
MAX_ELEMS_PER_THREAD = 64  # a [BT, BK] tile of more per thread spilled (ptxas -v, sm_90)
# float32 FMAs instead of tensor cores: for the float32 forward only, the one kernel where that
# form was faster (third lease, 16,384 tokens: 0.41 against 0.48 ms; 2.6x slower fwd+bwd)
FMA_TOO = {("fwd", "fp32")}
# token tiles from which products run on Hopper's wgmma and are left in flight across the loop
WGMMA_TOKENS = 64


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


def tiles_of(row: dict) -> dict:
    """The launch parameters of a result row."""
    return {field: row[field] for field in ct.Tiles._fields}


def sweep(kernel: str, name: str, T: int, n: int, C: int, device: str, bench, peak,
          parts: bool = False) -> list[dict]:  # fmt: skip
    """Every launch of ``kernel`` for ``name`` streams, accurate and fastest first: the grid, then
    the fastest ``RESTAGED`` with each of ``STAGES``. ``parts``: the grid on tensor cores with the
    float32 operand's parts split once per call, and the shipped launch."""
    key = (kernel, DTYPES[name].itemsize)
    shipped = ct.GPU_TILES[key]
    call, want, tolerance, nbytes = case(kernel, T, n, C, DTYPES[name], device)
    head = {"kernel": kernel, "dtype": name, "tokens": T, "n": n, "C": C}

    def measure(tiles: ct.Tiles) -> dict | None:
        """The row of one launch (``None``: it failed to compile or launch)."""
        ct.GPU_TILES[key] = tiles
        try:
            error = relative_error(call(), want)
            ms = bench(call)
        except Exception as failure:
            print(f"skip {head} {tiles}: {type(failure).__name__}", file=sys.stderr)
            return None
        finally:
            ct.GPU_TILES[key] = shipped
        return {**head, **tiles._asdict(), "ms": ms,
                "roofline_ratio": ms / (nbytes / (peak * 1e9) * 1e3) if peak else None,
                "relative_error": error, "accurate": error <= tolerance,
                "shipped": tiles == shipped}  # fmt: skip

    # tensor cores (with phi's parts, or with float32 phi), and float32 FMAs where they may win
    mma = [True] + [False] * (not parts and (kernel, name) in FMA_TOO)
    grid = itertools.product(BLOCKS_T, DPHI_BLOCKS_K if kernel == "dphi" else BLOCKS_K, WARPS,
                             PER_SM, mma)  # fmt: skip
    tried = [ct.Tiles(bt, bk, warps, per_sm, form, parts=parts,
                      sumsq_apart=parts and kernel == "fwd" and bt >= WGMMA_TOKENS)
             for bt, bk, warps, per_sm, form in grid
             if bt * bk // (32 * warps) <= MAX_ELEMS_PER_THREAD]  # fmt: skip
    tried += [shipped] * (shipped not in tried)
    found = [r for r in map(measure, tried) if r]
    fastest = sorted((r for r in found if r["accurate"]), key=lambda r: r["ms"])[:RESTAGED]
    restaged = [ct.Tiles(**{**tiles_of(r), "stages": st}) for r in fastest for st in STAGES]
    found += [r for r in map(measure, restaged) if r]
    return sorted(found, key=lambda r: (not r["accurate"], r["ms"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--C", type=int, default=1488)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--parts", action="store_true",
                        help="the float32 operand's bf16 parts split once per call")  # fmt: skip
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    T, n, C = args.tokens, args.n, args.C
    if ct.dot_width(n * n + 2 * n) > ct.SWEPT_COLUMNS:
        parser.error(f"GPU_TILES serve n <= 4 (W padded to <= {ct.SWEPT_COLUMNS} columns)")
    device, peak = "cuda" if ON_GPU else "cpu", peak_bandwidth_gbs()
    if not ON_GPU:
        ct.interpreting = lambda: False  # the GPU's tiles (the interpreter's bf16-dot fix stays)
    bench = sweep_timer(rep=10)
    rows = []
    for name, kernel in itertools.product(args.dtypes, args.kernels):
        found = sweep(kernel, name, T, n, C, device, bench, peak, args.parts)
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
