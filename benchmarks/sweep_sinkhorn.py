"""Sweep the Triton Sinkhorn kernels' launch parameters on a GPU: form, tile size, warps, programs.

    python benchmarks/sweep_sinkhorn.py [--n 4] [--batch 20 14] [--out FILE]

For each batch (2^k matrices of n x n, fp32, contiguous, 20 iterations) times the forward and the
backward kernel alone (``triton.testing.do_bench``, median ms) for every combination of matrices
per tile, warps and programs per SM, in both forms of the kernels (``by_matrix``: whole matrices
in a thread, where the launchers allow it; ``tiles``), and prints them fastest first next to the
shipped choice (``shipped``: the launchers' form and tile). Needs a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
from conftest import write_rows  # beside this script: on sys.path
from triton.testing import do_bench

from mhc_kernels._host import multiprocessors
from mhc_kernels.sinkhorn import triton as sk


def time_config(x, grad, form, block, warps, per_sm, iters=20):
    num_mats, n = x.shape[0], x.shape[-1]
    np2 = triton.next_power_of_2(n)
    sms = multiprocessors(x.device)
    programs = max(1, min(triton.cdiv(num_mats, block), per_sm * sms))
    first, second = sk.order_axes("col_row")
    out = torch.empty_like(x)
    dx = torch.empty_like(x)
    scratch = torch.empty(programs * 2 * iters * block * np2, device=x.device)
    consts = {"FIRST": first, "SECOND": second, "BLOCK": block, "NP": np2, "num_warps": warps}
    if form == "by_matrix":  # x and grad contiguous
        consts["LV"] = 2 * (np2.bit_length() - 1)

        def fwd():
            sk._sinkhorn_fwd_by_matrix_kernel[(programs,)](x, out, num_mats, iters, 1e-12, **consts)

        def bwd():
            sk._sinkhorn_bwd_by_matrix_kernel[(programs,)](x, grad, dx, scratch, num_mats, iters,
                                                           1e-12, **consts)  # fmt: skip
    else:

        def fwd():
            sk._sinkhorn_fwd_kernel[(programs,)](x, out, num_mats, n, *x.stride(), iters, 1e-12,
                                                 **consts)  # fmt: skip

        def bwd():
            sk._sinkhorn_bwd_kernel[(programs,)](x, grad, dx, scratch, num_mats, n, *x.stride(),
                                                 *grad.stride(), iters, 1e-12, **consts)  # fmt: skip

    timing = {"warmup": 5, "rep": 20, "return_mode": "median"}  # ms
    return do_bench(fwd, **timing), do_bench(bwd, **timing)


def launches(n: int):
    """``(form, matrices per tile, warps, programs per SM)`` to time for n x n matrices: by matrix
    first (whole matrices per thread, 1 or 2 per thread; where the launchers allow it), then in
    tiles (at most 64 floats per thread: more spilled)."""
    np2 = triton.next_power_of_2(n)
    grid = list(itertools.product((32, 64, 128, 256, 512), (1, 2, 4, 8), (2, 4, 8, 16, 64)))
    if sk.by_matrix(n):
        for block, warps, per_sm in grid:
            if block // (32 * warps) in (1, 2):
                yield "by_matrix", block, warps, per_sm
    for block, warps, per_sm in grid:
        if block * np2 * np2 // (32 * warps) <= 64:
            yield "tiles", block, warps, per_sm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[20, 14], help="log2 of the batch")
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sweep needs a GPU")
    rows = []
    for exponent in args.batch:
        x = torch.randn(2**exponent, args.n, args.n, device="cuda") * 2
        grad = torch.randn_like(x)
        if sk.by_matrix(args.n):
            consts = sk._by_matrix_launch(x.shape[0], args.n, x.device)[0]
            shipped = {"form": "by_matrix", "block": consts["BLOCK"], "warps": consts["num_warps"]}
        else:
            block, np2, _ = sk.launch_config(x.shape[0], args.n, x.device)
            shipped = {"form": "tiles", "block": block, "warps": sk.num_warps(np2)}
        for form, block, warps, per_sm in launches(args.n):
            try:
                fwd_ms, bwd_ms = time_config(x, grad, form, block, warps, per_sm)
            except Exception as error:  # a configuration that fails to compile or launch
                print(f"skip {form} block={block} warps={warps}: {type(error).__name__}",
                      file=sys.stderr)  # fmt: skip
                continue
            rows.append({"batch": 2**exponent, "n": args.n, "form": form, "block": block,
                         "warps": warps, "programs_per_sm": per_sm, "fwd_ms": fwd_ms,
                         "bwd_ms": bwd_ms, "shipped": shipped})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)  # a capped run keeps what it timed
        best = sorted((r for r in rows if r["batch"] == 2**exponent), key=lambda r: r["fwd_ms"])
        print("fastest:", *map(json.dumps, best[:6]), sep="\n")
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
