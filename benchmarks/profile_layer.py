"""Where an mHC block's time goes: ``torch.profiler`` tables for one Sinkhorn call and one block.

    python benchmarks/profile_layer.py [--out FILE]

Prints (and writes) the top operators by device time and by host time for (1) Sinkhorn-Knopp
fwd+bwd on 1,024 and 2^20 4x4 matrices and (2) the mHC-wrapped Llama block of
``test_layer_overhead.py`` (C = 1488, 16 sets of 256 cells, bf16 autocast) next to the plain block,
on a GPU also with every fused kernel (the projection too, whatever the width), and with bf16
streams (the fused backward) next to a bf16 residual: st_finetune's configuration.
Used by gpu_check.sh; on CPU it runs too (host times only).
"""

from __future__ import annotations

import argparse
import sys

import torch
from test_layer_overhead import Stack  # beside this script: on sys.path
from torch.profiler import ProfilerActivity, profile

from mhc_kernels import sinkhorn_knopp

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def profiled(label: str, fn, steps: int = 5) -> str:
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if ON_GPU:
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if ON_GPU else "self_cpu_time_total"
    parts = [f"## {label} ({steps} steps)", events.table(sort_by=sort, row_limit=18)]
    if ON_GPU:
        parts.append(events.table(sort_by="self_cpu_time_total", row_limit=10))
    return "\n".join(parts)


def sinkhorn_case(batch: int):
    x = torch.randn(batch, 4, 4, device=DEVICE, requires_grad=True)
    grad = torch.randn_like(x)

    def run():
        torch.autograd.grad(sinkhorn_knopp(x, 20), x, grad)

    return run


def block_case(variant: str, **options):
    torch.manual_seed(0)
    block = Stack(1488, 12, mhc=not variant.startswith("plain"), **options).to(DEVICE)
    x = torch.randn(16 if ON_GPU else 1, 256, 1488, device=DEVICE)

    def run():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):
            loss = block(x).float().pow(2).mean()
        loss.backward()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the tables here")
    args = parser.parse_args(argv)
    tables = [
        profiled("sinkhorn fwd+bwd, 1024 matrices", sinkhorn_case(1024)),
        profiled("sinkhorn fwd+bwd, 2^20 matrices", sinkhorn_case(2**20 if ON_GPU else 2**12)),
        profiled("plain block C=1488 fwd+bwd", block_case("plain")),
        profiled("mHC block C=1488 fwd+bwd", block_case("mhc")),
    ]
    if ON_GPU:  # the fused projection at any width (the interpreter would run it here)
        tables.append(profiled("mHC block C=1488 fwd+bwd, every fused kernel",
                               block_case("mhc", backend="triton")))  # fmt: skip
        tables.append(profiled("mHC block C=1488 fwd+bwd, every fused kernel, fused backward",
                               block_case("mhc", backend="triton", fused_backward=True)))  # fmt: skip
        # st_finetune's configuration under bf16 mixed precision: bf16 streams, a bf16 residual
        bf16 = {"stream_dtype": torch.bfloat16}
        tables.append(profiled("plain block C=1488 fwd+bwd, bf16 residual",
                               block_case("plain", **bf16)))  # fmt: skip
        tables.append(profiled("mHC block C=1488 fwd+bwd, bf16 streams, fused backward",
                               block_case("mhc", fused_backward=True, **bf16)))  # fmt: skip
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
