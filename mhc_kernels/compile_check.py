"""Compile the shipped Triton kernels for real GPU targets without a GPU; report registers and spills.

Run as ``python -m mhc_kernels.compile_check --arch 80 89 90`` (not under ``TRITON_INTERPRET``).
Prints one JSON object per kernel configuration and exits non-zero if any fails to compile, spills
registers to local memory, or takes longer than ``--max-seconds`` to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {
        key.lower(): int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)
    }


def _configs():
    from mhc_kernels.sinkhorn.triton import shipped_configs as sinkhorn_configs
    from mhc_kernels.streams.triton import shipped_configs as stream_configs

    return [*sinkhorn_configs(), *stream_configs()]


def compile_one(index: int, arch: int) -> dict:
    """Compile configuration ``index`` of the shipped list for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, signature, constexprs, num_warps = _configs()[index]
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps},
    )
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    return {"kernel": name, "arch": f"sm_{arch}", "compile_s": round(seconds, 3), **usage}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 89, 90])
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per-kernel compile limit")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for GPU targets")
    jobs = [(i, arch) for arch in args.arch for i in range(len(_configs()))]
    failures = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(compile_one, *zip(*jobs, strict=True)):
            spills = row["local"] or row["stack"]  # spill stores live in the stack frame
            row["ok"] = not spills and row["compile_s"] <= args.max_seconds
            failures += not row["ok"]
            print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
