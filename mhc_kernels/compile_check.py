"""Compile the shipped Triton kernels for real GPU targets without a GPU; report registers and spills.

Run as ``python -m mhc_kernels.compile_check --arch 80 89 90`` (not under ``TRITON_INTERPRET``).
Prints one JSON object per kernel configuration and exits non-zero if any fails to compile, spills
registers (``ptxas -v`` spill stores/loads, or local memory in the cubin), leaves a Hopper
tensor-core product in flight across a loop's back edge (``wgmma_in_flight``) reading what the
loop's next steps may overwrite first (``in_flight_safe``), or takes longer than
``--max-seconds`` to compile. ``stack`` is reported but not a failure: ptxas may reserve a few
bytes of stack frame without spilling.

Each kernel is compiled as Triton's launcher specialises it for the sizes it is built for: every
pointer 16-byte aligned (torch's allocations; the launchers pass contiguous tensors), and the
projection's ``K`` and part lengths ``k_per``/``t_per`` multiples of 16 (ST-Tahoe's K = 4 x 1488
is; the parts are multiples of its blocks). That is the variant with vectorised loads; without the
hints the check would compile scalar loads that never run there. The stream kernels' ``C`` gets no
hint: their ``CV`` = 8 states it as a multiple of 8, as the launchers do for any such C.
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


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, local and shared memory from ``cuobjdump --dump-resource-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)
    return {key.lower(): int(val) for key, val in found}


def _spills(ptx: str, arch: int) -> int:
    """Spill stores + loads in bytes, as ``ptxas -v`` reports them for this PTX and target."""
    tool = _nvidia_tool("ptxas-blackwell")
    if not os.path.exists(tool):
        tool = _nvidia_tool("ptxas")
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([tool, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)  # fmt: skip
    counts = re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stdout + done.stderr)
    if not counts:
        raise RuntimeError(f"ptxas -v printed no spill report: {done.stderr[-500:]}")
    return sum(int(c) for c in counts)


def _configs():
    from mhc_kernels.coefficients.triton import shipped_configs as projection_configs
    from mhc_kernels.sinkhorn.triton import shipped_configs as sinkhorn_configs
    from mhc_kernels.streams.triton import shipped_configs as stream_configs

    return [*sinkhorn_configs(), *stream_configs(), *projection_configs()]


def _ptx_shape(ptx: str) -> dict[str, int]:
    """Barriers (``bar.sync``: sums across warps or layout changes through shared memory), global
    loads by width (``b32``: 4 bytes, ``v2``: 8, ``v4``: 16 bytes per thread) and the global loads
    written after the first global store (``loads_after_store``): the compiler cannot tell that
    they do not alias the store, so each waits for its program to get there, a memory latency
    that other loads could have overlapped (as in the stream-by-stream merge backward). The count
    is textual: exact for straight-line kernels, while a loop that stores (Sinkhorn's persistent
    programs) counts its loads whatever ptxas makes of it."""
    widths = re.findall(r"\bld\.global(?:\.[A-Za-z_0-9:]+?)*?(?:\.(v[24]))?\.[bfsu]\d+\b", ptx)
    first_store = ptx.find("st.global")
    after = ptx[first_store:].count("ld.global") if first_store >= 0 else 0
    return {"barriers": ptx.count("bar.sync"),
            **{f"loads_{w or 'b32'}": widths.count(w) for w in ("", "v2", "v4")},
            "loads_after_store": after,
            "wgmma_in_flight": _wgmma_in_flight(ptx)}  # fmt: skip


def _wgmma_in_flight(ptx: str) -> int:
    """Loops (PTX back edges) whose last Hopper tensor-core product (``wgmma.mma_async``) is still
    in flight when the loop branches back: no ``wgmma.wait_group`` after its commit. Triton 3.6
    pipelined two projection forms so, and both were unsafe on the H200 (2026-11-27): with phi's
    parts, the bf16 forward's v tile had one shared buffer fewer than the stages, so the next
    ``cp.async`` overwrote the buffer that product was still reading (2-8% wrong sums in 20 of 49
    launches); the float32 forward rewrote that product's A registers at the loop's top before
    any wait, which PTX leaves undefined. A shipped configuration must have none, or only such
    as :func:`_in_flight_safe` finds safe."""
    return len(_in_flight_loops(ptx))


def _in_flight_loops(ptx: str) -> list[str]:
    """The bodies of the loops that :func:`_wgmma_in_flight` counts."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, m in enumerate(map(re.compile(r"\s*(\$L__BB\w+):").match, lines))
              if m}  # fmt: skip
    bodies = []
    for i, line in enumerate(lines):
        target = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)
        start = labels.get(target.group(1), i) if target else i
        if start < i:  # a back edge: the loop body is lines[start:i]
            body = "\n".join(lines[start:i])
            if body.rfind("wgmma.commit_group") > body.rfind("wgmma.wait_group"):
                bodies.append(body)
    return bodies


def _copies_after_wait(body: str) -> bool:
    """Whether a loop body's first ``cp.async`` copy (if any) follows its first
    ``wgmma.wait_group``."""
    copy = re.search(r"\bcp\.async\.c[ag]\b", body)
    wait = body.find("wgmma.wait_group")
    return copy is None or 0 <= wait < copy.start()


def _in_flight_safe(ptx: str, ttgir: str, stages: int) -> bool:
    """Whether tensor-core products that a loop leaves in flight (``wgmma_in_flight``) read only
    what its next steps cannot overwrite before they wait for them, read from Triton's TTGIR and
    the PTX:

    - every product (``ttng.warp_group_dot``) takes both operands from shared memory: with one
      in registers (the float32 forward with phi's parts), Triton 3.6 rewrote those registers at
      the next step's top, before any wait;
    - every multi-buffered shared allocation has a buffer per pipeline stage (``stages`` >= 2):
      the ``cp.async`` at the bottom of step i fills buffer ``(i + stages - 1) % buffers``, which
      is the one step i's products read when ``buffers = stages - 1`` (the bf16 forward with
      phi's parts, whose v tile also fed the sum of squares in registers: 2-8% wrong sums on the
      H200); with ``buffers = stages`` it is refilled only in step i + 1, after that step's wait;
    - nothing is stored into shared memory from registers (``ttg.local_alloc`` of a value, as a
      split in the loop makes for its parts): such a buffer is rewritten every step;
    - in the loop's PTX, its copies (``cp.async``) come after its first ``wgmma.wait_group``,
      which waits for the previous step's last product: buffer ``(i + stages - 1) % stages`` is
      the one that product read.

    Conservative: a loop whose products all end waited for needs none of this (``wgmma_in_flight``
    is 0 and this is not asked); any other allocation, operand kind or form is unsafe."""
    products = [re.sub(r"\{[^}]*\}", "", line).rsplit(" : ", 1)[-1]
                for line in ttgir.splitlines() if "ttng.warp_group_dot %" in line]  # fmt: skip
    operands = [re.fullmatch(r"\s*(\S+<[^>]*>)\s\*\s(\S+<[^>]*>)\s->.*", p) for p in products]
    buffers = re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x", ttgir)
    copies_after_wait = all(_copies_after_wait(body) for body in _in_flight_loops(ptx))
    return (stages >= 2 and copies_after_wait
            and all(m is not None and m[1].startswith("!ttg.memdesc")
                    and m[2].startswith("!ttg.memdesc") for m in operands)
            and all(int(count) == stages for count in buffers)
            and re.search(r"ttg\.local_alloc %", ttgir) is None)  # fmt: skip


ALIGNED_INTS = ("K", "k_per", "t_per")
DEFAULT_STAGES = 3  # Triton's num_stages when a launch does not give one


def launch_attrs(kernel, signature: dict[str, str]) -> dict:
    """The ``tt.divisibility`` hints Triton's launcher gives aligned pointers and ``ALIGNED_INTS``."""
    return {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]]
            for arg, kind in signature.items() if kind.startswith("*") or arg in ALIGNED_INTS}  # fmt: skip


def compile_one(index: int, arch: int) -> dict:
    """Compile configuration ``index`` of the shipped list for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, signature, constexprs, launch = _configs()[index]
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(
            fn=kernel,
            signature=signature,
            constexprs=constexprs,
            attrs=launch_attrs(kernel, signature),
        ),
        target=GPUTarget("cuda", arch, 32),
        options=launch,
    )
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    usage = _resource_usage(compiled.asm["cubin"])
    usage["spill_bytes"] = _spills(ptx, arch)
    usage |= _ptx_shape(ptx)
    usage["in_flight_safe"] = not usage["wgmma_in_flight"] or _in_flight_safe(
        ptx, compiled.asm["ttgir"], launch.get("num_stages", DEFAULT_STAGES)
    )
    return {"kernel": name, "arch": f"sm_{arch}", "compile_s": round(seconds, 3), **usage}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 89, 90])
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per-kernel compile limit")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="compile only kernels whose name has this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for GPU targets")
    names = [config[0] for config in _configs()]
    jobs = [(i, arch) for arch in args.arch for i, name in enumerate(names) if args.only in name]
    failures = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(compile_one, *zip(*jobs, strict=True)):
            spills = row["local"] or row["spill_bytes"]
            row["ok"] = (not spills and row["in_flight_safe"]
                         and row["compile_s"] <= args.max_seconds)  # fmt: skip
            failures += not row["ok"]
            print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
