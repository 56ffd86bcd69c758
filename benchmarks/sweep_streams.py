"""Sweep the Triton stream kernels' launch parameters on a GPU: tokens and channels per program, warps.

    python benchmarks/sweep_streams.py [--tokens 16384] [--C 1488] [--n 4] [--dtypes fp32 bf16]
                                       [--kernels merge_bwd ...] [--out FILE]

For pre-mix and merge, forward and backward kernels alone, and the fused backward's stream
gradient kernel (fp32 streams by default), times every combination of tokens per program (BT),
channels per program (BC) and warps (``triton.testing.do_bench``, median ms), with the roofline
ratio (unavoidable bytes at the GPU's peak DRAM bandwidth, as in test_streams.py), and prints them
fastest first next to the shipped choice. The kernels are the shipped ones; only the launch
parameters and the kernels' second forms vary: 47 launches per pre-mix/merge kernel (128-2048
channels, 1-8 tokens per program, 1-8 warps), the merge backward also in its loads-first form
(``LOADS_FIRST``, n <= 4: every load before the first store; 33 launches more at float32, at
most 32 elements per thread in each of its three stream tiles, 47 at 16 bits, at most 64), 44
for the stream gradient (4-32 tokens sharing phi^T's rows) and its 8 fastest again with 2, 4 and
8 rank-1 updates per step of its loop over W (``UNROLL``; 4 as shipped: each step waits on its
loads) and with that loop's loads copied 1-2 steps ahead (``STAGES`` 2-3 at 1, 2 or 4 updates
per step; 1 as shipped): 64 more, and the shipped launch if none of them is it (a form with its
projection term on tensor cores, 1.07-1.22x slower in both H200 sweeps that timed it, was
removed). ``merge_bwd_mma`` (16-bit streams): the merge backward on tensor cores
(``_merge_bwd_mma_kernel``, not shipped: ``MERGE_MMA``), 16-64 rows (tokens x padded streams) x
256-2048 channels per program x 32-128 channels per loop step x 2-8 warps at 2 stages, its 6
fastest accurate at 1, 3 and 4 (122 launches at n = 4), each checked against the shipped launch's
results (``max_rel_err``, ``accurate``: within 4 ulps of the streams' dtype), which is timed in
the same run. One warp per program (added after the third H200 lease; never timed before): its
sums over C are warp shuffles without barriers (PTX of the n = 4 merge backward, sm_90: 4
barriers at 256 channels on one warp, against 19 as shipped, 512 channels on two; 119 with 2
tokens on two warps, which Triton lays out across the channels rather than one warp per token). The rows found so far are written after
every kernel, so a run cut short keeps them.

Without a GPU it runs under ``TRITON_INTERPRET=1`` (benchmarks/conftest.py sets it) at whatever
size it is given (``--tokens 8 --C 136``: a few minutes per kernel and dtype): a check of the
script before device time is spent on it; its times mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys

import torch
from conftest import ON_GPU, peak_bandwidth_gbs, sweep_timer, write_rows  # beside this script

from mhc_kernels._host import cdiv, next_power_of_2
from mhc_kernels._split_dot import parts_fp32
from mhc_kernels.streams import triton as st


def kernel_launcher(kernel: str, T: int, n: int, C: int, dtype: torch.dtype, device: str):
    """``(launch(BT, BC, warps, ...), unavoidable bytes, results())`` for one kernel, its tensors
    made once (the same for every kernel of the same arguments: one seed)."""
    torch.manual_seed(0)
    x = torch.randn(T, n, C, device=device).to(dtype)
    y, g2 = torch.randn(T, C, device=device).to(dtype), torch.randn(T, C, device=device).to(dtype)
    h, h_res = torch.rand(T, n, device=device), torch.rand(T, n, n, device=device)
    parts = cdiv(C, min(BLOCKS_C))  # per-C-block partial sums: room for the most blocks
    e = x.element_size()
    if kernel == "pre_mix_fwd":
        args = (x, h, torch.empty(T, C, device=device, dtype=dtype))
        nbytes = (n * C + C) * T * e
    elif kernel == "pre_mix_bwd":
        args = (x, h, g2, torch.empty_like(x), torch.empty(parts, T, n, device=device))
        nbytes = (2 * n * C + C) * T * e
    elif kernel == "merge_fwd":
        args = (x, y, h, h_res, torch.empty_like(x))
        nbytes = (2 * n * C + C) * T * e
    elif kernel == "stream_grad":  # with the merge's term, as in a connection's backward
        W = n * n + 2 * n
        args = (x, g2, torch.randn_like(x), h, h_res, torch.rand(T, device=device),
                torch.randn(T, W, device=device), torch.randn(W, n * C, device=device),
                torch.empty_like(x))  # fmt: skip
        nbytes = (3 * n * C + C) * T * e
    else:
        args = (
            x,
            y,
            h,
            h_res,
            torch.randn_like(x),
            torch.empty_like(x),
            torch.empty_like(y),
            torch.empty(parts, T, n, device=device),
            torch.empty(parts, T, n, n, device=device),
        )
        nbytes = (3 * n * C + 2 * C) * T * e
    fn = st._merge_bwd_mma_kernel if kernel == "merge_bwd_mma" else getattr(st, f"_{kernel}_kernel")
    # the backwards as autograd's
    extra = {"WRITE_DX": True} if kernel.endswith(("_bwd", "_mma")) else {}
    sizes = (T, n, C)
    if kernel == "stream_grad":
        sizes = (T, n, C, n * n + 2 * n)
        extra = {"HAS_GOUT": True}

    def launch(bt: int, bc: int, warps: int, form: str = "", unroll: int = 1, bk: int = 0,
               stages: int = 1):  # fmt: skip
        """``form``: the merge backward's (``LOADS_FIRST``: "loads_first" or "by_stream");
        ``unroll``: the stream gradient's rank-1 updates per loop step (``UNROLL``, its FMA form);
        ``bk``: the tensor-core merge backward's channels per loop step; ``stages``: its pipeline
        stages, and the stream gradient's (``STAGES``)."""
        options = extra
        if kernel == "stream_grad":
            options = {**extra, "UNROLL": unroll, "STAGES": stages}
        elif kernel == "merge_bwd":
            options = {**extra, "LOADS_FIRST": form == "loads_first"}
        elif kernel == "merge_bwd_mma":
            options = {**extra, "BK": bk, "STAGES": stages, "PARTS_FP32": parts_fp32()}
        fn[(cdiv(T, bt), cdiv(C, bc))](*args, *sizes, BT=bt, NP=next_power_of_2(n), BC=bc,
                                       CV=8 if C % 8 == 0 else 1, num_warps=warps,
                                       **options)  # fmt: skip

    def results(bc: int) -> list[torch.Tensor]:
        """The merge backward's results of its last launch, of ``bc`` channels per program: dx,
        dy and the coefficient gradients (its C blocks' shares summed)."""
        dx, dy, dh_post, dh_res = args[5:9]
        blocks = cdiv(C, bc)
        return [dx, dy, dh_post[:blocks].sum(0), dh_res[:blocks].sum(0)]

    return launch, nbytes, results


BLOCKS_T, BLOCKS_C, WARPS = (1, 2, 4, 8), (128, 256, 512, 1024, 2048), (1, 2, 4, 8)
KERNELS = ("pre_mix_fwd", "pre_mix_bwd", "merge_fwd", "merge_bwd", "stream_grad", "merge_bwd_mma")
# the stream gradient's programs share phi^T's rows between their tokens: more tokens, narrower C
GRAD_BLOCKS_T, GRAD_BLOCKS_C = (4, 8, 16, 32), (32, 64, 128, 256)
# its RETIMED fastest launches are timed again with each (rank-1 updates per loop step, stages)
RETIMED = 8
RETIMES = ((2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (4, 2), (1, 3), (4, 3))
# the merge backward on tensor cores (16-bit streams): rows per program (tokens x padded streams),
# C blocks, channels per loop step and warps, at 2 stages; its MMA_RETIMED fastest at MMA_STAGES
MMA_ROWS, MMA_BLOCKS_C, MMA_STEPS, MMA_WARPS = (
    (16, 32, 64),
    (256, 512, 1024, 2048),
    (32, 64, 128),
    (2, 4, 8),
)
MMA_STAGES, MMA_RETIMED = (1, 3, 4), 6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sweep_kernel(kernel: str, name: str, T: int, n: int, C: int, device: str, bench,
                 peak: float | None) -> list[dict]:  # fmt: skip
    """Every launch of ``kernel`` for streams of dtype ``name``, timed by ``bench``, fastest
    first."""
    if kernel == "merge_bwd_mma":
        return sweep_mma(name, T, n, C, device, bench, peak)
    grad = kernel == "stream_grad"
    configure = st.stream_grad_config if grad else functools.partial(st.launch_config, kernel)
    config = configure(T, n, C, DTYPES[name].itemsize)
    shipped = (config["BT"], config["BC"], config["num_warps"], shipped_form(kernel, n),
               config.get("UNROLL", 1), config.get("STAGES", 1))  # fmt: skip
    launch, nbytes, _ = kernel_launcher(kernel, T, n, C, DTYPES[name], device)
    row = functools.partial(timed_row, kernel, name, (T, n, C), device, bench, peak, nbytes)

    def timed(bt: int, bc: int, warps: int, form: str, unroll: int = 1,
              stages: int = 1) -> dict | None:  # fmt: skip
        return row(functools.partial(launch, bt, bc, warps, form, unroll, stages=stages),
                   {"BT": bt, "BC": bc, "warps": warps, "form": form, "unroll": unroll,
                    "stages": stages,
                    "shipped": (bt, bc, warps, form, unroll, stages) == shipped})  # fmt: skip

    blocks = (GRAD_BLOCKS_T, GRAD_BLOCKS_C) if grad else (BLOCKS_T, BLOCKS_C)
    # the merge backward also with every load before its first store (n <= 4)
    forms = ("",)
    if kernel == "merge_bwd":
        forms = ("by_stream", "loads_first") if n <= st.LOADS_FIRST_STREAMS else ("by_stream",)
    found = []
    for bt, bc, warps, form in itertools.product(*blocks, WARPS, forms):
        per_thread = bt * next_power_of_2(n) * bc // (32 * warps)
        # at most 64 elements per thread; loads first holds g, x and dx, 3 such tiles: 32 float32
        # ones, or 64 16-bit ones (n = 4 bf16, 512 channels on one warp: 168 registers on sm_90,
        # no spills, where the stream-by-stream form on one warp was the sweep's second best)
        loads_first = form == "loads_first"
        if per_thread > 64 or (loads_first and per_thread > 32 * (4 // DTYPES[name].itemsize)):
            continue
        found.append(timed(bt, bc, warps, form))
    if grad:  # the fastest launches again, more updates per loop step, loads copied ahead
        fastest = sorted((r for r in found if r), key=lambda r: r["ms"])[:RETIMED]
        for r, (unroll, stages) in itertools.product(fastest, RETIMES):
            found.append(timed(r["BT"], r["BC"], r["warps"], "", unroll, stages))
        if not any(r and r["shipped"] for r in found):  # the baseline, in the same run
            found.append(timed(*shipped))
    return sorted((r for r in found if r), key=lambda r: r["ms"])


def shipped_form(kernel: str, n: int) -> str:
    if kernel != "merge_bwd":
        return ""
    return "loads_first" if st.merge_loads_first(n) else "by_stream"


def timed_row(kernel, name, sizes, device, bench, peak, nbytes, call, fields) -> dict | None:
    """``call`` timed by ``bench`` as a row of the sweep (``None`` if it fails on a GPU)."""
    try:
        ms = bench(call)
    except Exception as error:  # a configuration that fails to compile or launch
        if device == "cpu":
            raise  # the interpreter has no resources to run out of: the script is wrong
        print(f"skip {kernel} {fields}: {type(error).__name__}", file=sys.stderr)
        return None
    T, n, C = sizes
    return {"kernel": kernel, "dtype": name, "tokens": T, "n": n, "C": C, **fields, "ms": ms,
            "roofline_ratio": ms / (nbytes / (peak * 1e9) * 1e3) if peak else None}  # fmt: skip


def sweep_mma(name: str, T: int, n: int, C: int, device: str, bench,
              peak: float | None) -> list[dict]:  # fmt: skip
    """The merge backward on tensor cores (``_merge_bwd_mma_kernel``, 16-bit streams): rows per
    program x C block x channels per loop step x warps at 2 stages, then the ``MMA_RETIMED``
    fastest at ``MMA_STAGES``; beside them, in the same run, the shipped launch (the baseline).
    Each launch's results are checked against the shipped launch's (a new pipelined form: the
    projection's race of 2026-11-27 was found so), ``max_rel_err`` and ``accurate``."""
    dtype = DTYPES[name]
    base, nbytes, base_results = kernel_launcher("merge_bwd", T, n, C, dtype, device)
    config = st.launch_config("merge_bwd", T, n, C, dtype.itemsize)
    fields = {"BT": config["BT"], "BC": config["BC"], "warps": config["num_warps"],
              "form": shipped_form("merge_bwd", n), "unroll": 1, "shipped": True}  # fmt: skip
    baseline = timed_row("merge_bwd", name, (T, n, C), device, bench, peak, nbytes,
                         functools.partial(base, config["BT"], config["BC"], config["num_warps"],
                                           fields["form"]), fields)  # fmt: skip
    want = [t.double().clone() for t in base_results(config["BC"])]
    launch, _, results = kernel_launcher("merge_bwd_mma", T, n, C, dtype, device)  # same inputs
    np2 = next_power_of_2(n)

    def timed(rows: int, bc: int, bk: int, warps: int, stages: int) -> dict | None:
        bt = max(1, rows // np2)
        row = timed_row("merge_bwd_mma", name, (T, n, C), device, bench, peak, nbytes,
                        functools.partial(launch, bt, bc, warps, "mma", 1, bk, stages),
                        {"BT": bt, "BC": bc, "BK": bk, "warps": warps, "stages": stages,
                         "form": "mma", "unroll": 1, "shipped": False})  # fmt: skip
        if row:
            errors = [((g.double() - w).abs().max() / w.abs().max()).item()
                      for g, w in zip(results(bc), want, strict=True)]  # fmt: skip
            row["max_rel_err"] = max(errors)
            row["accurate"] = row["max_rel_err"] <= 4 * torch.finfo(dtype).eps
        return row

    found = [timed(rows, bc, bk, warps, 2)
             for rows, bc, bk, warps in itertools.product(MMA_ROWS, MMA_BLOCKS_C, MMA_STEPS,
                                                          MMA_WARPS)
             if bk <= bc and rows * bk // (32 * warps) <= 64 and rows >= np2]  # fmt: skip
    fastest = sorted((r for r in found if r and r["accurate"]), key=lambda r: r["ms"])
    for r, stages in itertools.product(fastest[:MMA_RETIMED], MMA_STAGES):
        found.append(timed(r["BT"] * np2, r["BC"], r["BK"], r["warps"], stages))
    return sorted((r for r in [baseline, *found] if r), key=lambda r: r["ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16 * 1024)
    parser.add_argument("--C", type=int, default=1488)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--out", help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    device, peak, bench = "cuda" if ON_GPU else "cpu", peak_bandwidth_gbs(), sweep_timer(rep=20)
    if not ON_GPU:
        st.interpreting = lambda: False  # the GPU's launches are the shipped ones
    rows = []
    for kernel, name in itertools.product(args.kernels, args.dtypes):
        found = sweep_kernel(kernel, name, args.tokens, args.n, args.C, device, bench, peak)
        for r in found[:5] + [r for r in found[5:] if r["shipped"]]:
            print(json.dumps(r), flush=True)
        rows += found
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
