"""Summarise a ``pytest benchmarks --benchmark-json FILE`` run: medians, speed-ups, targets.

    python benchmarks/summarize.py FILE [FILE ...] [--out results.json]

Several files (one per pytest run of the same session, as benchmarks/gpu_check.sh writes them) are
merged into one summary.

Speed-ups compare providers measured in the same run only, by their back-to-back time per call
where the run recorded one (GPU kernel benchmarks: the GPU's time, without one call's host
dispatch and synchronisation) and by the median of single synchronised calls otherwise. Targets are
those of the issues (FACTS.md §4 for the roofline): they are reported as met or not, never
loosened here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load_rows(path: str) -> tuple[dict, list[dict]]:
    """Rows of a pytest-benchmark JSON file, or of a ``MHC_BENCH_JSONL`` file (one row per line)."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            return {}, [json.loads(line) for line in f if line.strip()]
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        row = dict(bench.get("extra_info", {}))
        row["name"] = bench["name"]
        row["median_s"] = bench["stats"]["median"]
        rows.append(row)
    return data.get("machine_info", {}), rows


def seconds(row: dict) -> float:
    """A kernel benchmark row's time per call: back to back where measured (GPU), else the median."""
    return row.get("back_to_back_s") or row["median_s"]


def sinkhorn_summary(rows: list[dict]) -> dict:
    by_case: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("provider") and "batch" in row:
            case = (row["n"], row["dtype"], row["passes"], row["batch"])
            by_case[case][row["provider"]] = seconds(row)
    cases = []
    for (n, dtype, passes, batch), times in sorted(by_case.items()):
        entry = {"n": n, "dtype": dtype, "passes": passes, "batch": batch, "seconds": times}
        for fast, slow in (("triton", "eager"), ("triton", "compile"), ("eager", "naive")):
            if fast in times and slow in times:
                entry[f"{fast}_vs_{slow}"] = times[slow] / times[fast]
        cases.append(entry)
    targets = {}
    key = {r["name"]: r for r in rows if r.get("provider") == "triton" and "batch" in r}
    for row in key.values():
        if (row["n"], row["dtype"], row["batch"]) == (4, "fp32", 2**20):
            targets[f"triton_{row['passes']}_roofline_ratio"] = row.get("roofline_ratio")
    for entry in cases:
        if (entry["n"], entry["dtype"], entry["batch"], entry["passes"]) == (
            4,
            "fp32",
            2**20,
            "fwd+bwd",
        ):
            targets["fwd+bwd_triton_vs_compile (target >= 5)"] = entry.get("triton_vs_compile")
            targets["fwd+bwd_triton_vs_eager (target >= 20)"] = entry.get("triton_vs_eager")
    eager_vs_naive = [
        e["eager_vs_naive"] for e in cases if e["passes"] == "fwd+bwd" and "eager_vs_naive" in e
    ]
    if eager_vs_naive:
        targets["reference_vs_naive_fwd+bwd (target >= 2), min over cases"] = min(eager_vs_naive)
    memory = [r for r in rows if "saved_bytes_naive" in r]
    if memory:
        targets["reference_saved_memory_vs_naive (target >= 5), min"] = min(
            r["ratio"] for r in memory
        )
    return {"cases": cases, "targets": targets}


def plain_of(variant: str, measured, suffix: str = "") -> str:
    """The plain block an mHC variant is compared with: bf16 streams with the bf16 residual, a
    compiled or graphed variant (``suffix``) with the plain block run so."""
    if "bf16_streams" in variant and "plain_bf16_residual" + suffix in measured:
        return "plain_bf16_residual" + suffix
    return "plain" + suffix


def layer_summary(rows: list[dict]) -> dict:
    """Overhead of mHC over the plain residual, per block width and dtype (same run)."""
    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("variant") and "cells" in row and not row.get("finetune"):
            times[(row["dim"], row["dtype"])][row["variant"]] = row["median_s"]
    out = {}
    for (dim, dtype), t in sorted(times.items()):
        extra = {}  # a compiled (graphed) variant against the compiled (graphed) plain block
        for v, s in t.items():
            suffix = next((x for x in ("_compiled", "_graphed") if v.endswith(x)), "")
            base = plain_of(v, t, suffix)
            if v != base and base in t:
                extra[f"overhead_{v}"] = s / t[base] - 1
            shipped = v.replace("_candidates", "")  # the launches not shipped against the shipped
            if v != shipped and shipped in t:
                extra[f"speedup_{v}"] = t[shipped] / s
        out[f"C{dim}-{dtype}"] = {**t, **extra}
    return out


def memory_summary(rows: list[dict]) -> dict:
    """Activation memory of the 6-layer stack per dtype: saved bytes (and GPU step peaks) in MB
    and their ratios to the plain residual (target <= 1.2 with recomputation)."""
    out = {}
    for row in rows:
        if "saved_bytes" in row:
            entry = {}
            for kind in ("saved", "peak_step"):
                measured = row.get(f"{kind}_bytes") or {}
                entry[f"{kind}_MB"] = {k: round(v / 1e6, 1) for k, v in measured.items()}
                entry |= {f"{kind}_{k}_vs_{plain_of(k, measured)}":
                          round(v / measured[plain_of(k, measured)], 3)
                          for k, v in measured.items() if not k.startswith("plain")}  # fmt: skip
            out[f"C{row['dim']}-L{row['layers']}-{row['dtype']}"] = entry
    return out


STREAM_KERNELS = ("projection", "epilogue", "pre_mix", "merge", "stream_grad")


def streams_summary(rows: list[dict]) -> dict:
    """Fused stream kernels: time per provider, speed-ups and roofline ratio (same run)."""
    cases: dict[tuple, dict] = defaultdict(dict)
    for row in rows:
        if row.get("kernel") in STREAM_KERNELS and "tokens" in row:
            key = (row["kernel"], row["passes"], row["dtype"], row["tokens"])
            cases[key][row["provider"]] = seconds(row)
            if row["provider"] == "triton" and "roofline_ratio" in row:
                cases[key]["triton_roofline_ratio (target <= 1.3)"] = row["roofline_ratio"]
    out = {}
    for (kernel, passes, dtype, tokens), entry in sorted(cases.items()):
        # triton_fma: the projection on FMAs; triton_mma: the stream gradient on tensor cores (in
        # the runs before that form was removed, 2026-11-27)
        for slow in ("eager", "compile", "triton_fma", "triton_mma"):
            if "triton" in entry and slow in entry:
                entry[f"triton_vs_{slow}"] = entry[slow] / entry["triton"]
        out[f"{kernel}-{passes}-{dtype}-T{tokens}"] = entry
    return out


def connection_summary(rows: list[dict]) -> dict:
    """One connection alone, fwd+bwd (``test_connection_fwd_bwd``): time per backend with and
    without the fused backward, its speed-up and roofline ratios (same run)."""
    out: dict[str, dict] = defaultdict(dict)
    for row in rows:
        if row.get("kernel") == "connection":
            case = out[f"{row['dtype']}-T{row['tokens']}"]
            way = "fused_backward" if row["fused_backward"] else "autograd_sum"
            case[f"{row['backend']}-{way}"] = seconds(row)
            if "roofline_ratio" in row:
                case[f"{row['backend']}-{way}-roofline_ratio"] = row["roofline_ratio"]
    for case in out.values():
        for backend in ("auto", "triton"):
            plain, fused = (
                case.get(f"{backend}-autograd_sum"),
                case.get(f"{backend}-fused_backward"),
            )
            if plain and fused:
                case[f"{backend}-fused_speedup"] = plain / fused
    return dict(out)


FINETUNE_RATIOS = {"median_s": "time", "back_to_back_s": "back_to_back",
                   "activation_bytes_per_set": "activation_memory",
                   "peak_memory_bytes": "peak_memory", "step_memory_bytes": "step_memory"}  # fmt: skip


def finetune_summary(rows: list[dict]) -> dict:
    """One fine-tuning step of the ST-Tahoe-shaped model (``test_finetune_step``): time and memory
    per variant, and each mHC variant against ``lora`` of the same run (``<what>_vs_lora``)."""
    keys = (*FINETUNE_RATIOS, "finite", "trainable_params")
    out = {r["variant"]: {k: r[k] for k in keys if k in r} for r in rows if r.get("finetune")}
    base = out.get("lora", {})
    for variant, entry in out.items():
        for key, name in FINETUNE_RATIOS.items():
            if variant != "lora" and entry.get(key) and base.get(key):
                entry[f"{name}_vs_lora"] = entry[key] / base[key]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_json", nargs="+")
    parser.add_argument("--out", help="write the summary here as JSON (default: stdout)")
    args = parser.parse_args(argv)
    machine, rows = {}, []
    for path in args.benchmark_json:
        found_machine, found_rows = load_rows(path)
        machine = machine or found_machine
        rows += found_rows
    env_keys = ("device", "torch", "triton", "commit", "peak_bandwidth_gbs")
    env = {k: next((r[k] for r in rows if k in r), None) for k in env_keys}
    summary = {"environment": env, "machine": machine.get("cpu", {}).get("brand_raw")}
    summary["sinkhorn"] = sinkhorn_summary(rows)
    summary["layer_overhead"] = layer_summary(rows)
    summary["activation_memory"] = memory_summary(rows)
    summary["streams"] = streams_summary(rows)
    summary["connection"] = connection_summary(rows)
    summary["finetune_step"] = finetune_summary(rows)
    summary["rows"] = rows
    text = json.dumps(summary, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
