#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU and no internet, run the kernel tests
# natively (no interpreter), the kernel and layer benchmarks, a fine-tuning step of the main job's
# model, the large stability suite and the torch.compile baselines, each as its own capped step so
# that a slow step loses only itself. Needs only torch, triton, numpy, pytest, pytest-benchmark
# and, for the fine-tuning step, peft, transformers, lightning and pyyaml (pytest-xdist and
# matplotlib used when present; no geomloss, no anndata). Writes
# benchmarks/results/gpu-<name>-<time>.json (the summary of every step that finished) and
# benchmarks/results/stability-large/; with $OUT set, also packs
# everything (logs, one JSON line per measured case, test report, profile) into
# $OUT/gpu-<name>-<time>.tgz after every step. Each step is capped (fine-tuning step 120 s, tests
# 150, Sinkhorn 120, layer + streams 150, graphs 120, profile 60, sweep 120, sweep-projection 240,
# sweep-parts 200, sweep-merge 180, sweep-mma 180, sweep-grad 240, sweep-streams 180, compile
# 240, large stability 540): run the steps that fit the device time with MHC_GPU_STEPS (names below; all by
# default), narrow the torch.compile cases with MHC_COMPILE_CASES and the large stability runs
# with MHC_STABILITY_CASES (each a pytest -k).
# On an H200 (2026-11-27) the steps' pytest times were: tests 96-111 s, Sinkhorn 50, layer +
# streams 71-91, graphs 12-29, compile 202; finetune, layer-streams, graphs, profile and
# sweep-streams (fp32 and bf16) took 309 s in one call; sweep-projection (without stages) 113 s,
# sweep-parts 72 s, sweep-merge 121 s, sweep-grad 105 s, tests 97-122 s (fifth lease),
# sweep-streams (backwards) over 180; large stability: plain 60 s, HC 180 s, mHC more (run it in
# a call of its own); a machine start costs 40-120 s more.
# Usage: [MHC_BENCH_COMMIT=<sha>] [MHC_GPU_STEPS="tests sinkhorn"] bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || python -m pip install --quiet --no-deps -e . >/dev/null 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
name="gpu-${gpu}-$(date -u +%Y%m%dT%H%M%SZ)"
work="$(mktemp -d)/$name"
mkdir -p "$work" benchmarks/results
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$work/nvidia-smi.csv" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$work/versions.txt"

pack() {  # summary of the finished steps, then everything into one archive under $OUT
  local benches=("$work"/bench-*.jsonl)
  if [ -e "${benches[0]}" ]; then
    python benchmarks/summarize.py "${benches[@]}" --out "$work/$name.json" \
      && cp "$work/$name.json" benchmarks/results/
  fi
  cp -r benchmarks/results/stability-large "$work/" 2>/dev/null
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/$name.tgz" -C "$(dirname "$work")" "$name"; fi
}

step() {  # step NAME SECONDS COMMAND...: run capped, log to $work/NAME.log, then pack
  local label=$1 limit=$2
  shift 2
  export MHC_BENCH_JSONL="$work/bench-$label.jsonl"
  echo "== $label (cap ${limit} s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$work/$label.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  grep -E "FAILED|ERROR" "$work/$label.log" | head -20
  tail -n 25 "$work/$label.log"
  echo "== $label: exit $rc after $((SECONDS - start)) s"
  pack
}

xdist=()
python -c "import xdist" 2>/dev/null && xdist=(-n "$(nproc)")
bench=(python -m pytest --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr)

ALL_STEPS="finetune tests sinkhorn layer-streams graphs profile sweep sweep-projection sweep-parts"
ALL_STEPS+=" sweep-merge sweep-mma sweep-grad sweep-streams"
ALL_STEPS+=" compile stability-large"
want() { [[ " ${MHC_GPU_STEPS:-$ALL_STEPS} " == *" $1 "* ]]; }

# the main job's model (ST-Tahoe's shape, peft LoRA, mHC) training under bf16 autocast
want finetune && step finetune 120 "${bench[@]}" benchmarks/test_finetune_step.py
# -v: every result is logged as it finishes, so a capped run still names its failures
want tests && step tests 150 python -m pytest tests/mhc_kernels -v --tb=short -p no:cacheprovider \
  "${xdist[@]}" -k "not compiles" --junitxml="$work/kernel-tests.xml"
want sinkhorn && step sinkhorn 120 "${bench[@]}" benchmarks/test_sinkhorn.py -k "not compile"
want layer-streams && step layer-streams 150 "${bench[@]}" benchmarks/test_layer_overhead.py \
  benchmarks/test_streams.py -k "not compile and not graphed"
# CUDA-graph capture in a process of its own: a capture that fails can leave the context unusable
want graphs && step graphs 120 "${bench[@]}" benchmarks/test_layer_overhead.py -k graphed
want profile && step profile 60 python benchmarks/profile_layer.py --out "$work/profile.txt"
want sweep && step sweep 120 python benchmarks/sweep_sinkhorn.py --out "$work/sweep.json"
# the projection's tiles, warps, split, form and stages (bf16 then fp32; 257 compiles, 579 launches)
want sweep-projection && step sweep-projection 240 python benchmarks/sweep_projection.py \
  --out "$work/sweep-projection.json"
# the projection's kernels with their float32 operand's bf16 parts split once per call (dphi:
# dproj's, never timed; the forward and dv: phi's), bf16 streams (float32's, swept in the fifth
# lease: its faster forms there hold an operand in registers under a product left in flight,
# which compile_check rejects): 69 launches per kernel (dphi 84, with 256 K columns), the shipped
# launch and 16 restaged ones (fwd and dv in both dtypes took 72 s in the fifth lease)
want sweep-parts && step sweep-parts 200 python benchmarks/sweep_projection.py --parts \
  --dtypes bf16 --kernels dphi fwd dv --out "$work/sweep-parts.json"
# the merge backward alone, both forms (stream by stream, loads first): 94 launches for bf16 (47
# loads first, up to 64 elements per thread), 80 for fp32
want sweep-merge && step sweep-merge 180 python benchmarks/sweep_streams.py \
  --dtypes bf16 fp32 --kernels merge_bwd --out "$work/sweep-merge.json"
# the merge backward on tensor cores (bf16; not shipped: MERGE_MMA), the shipped launch beside it
want sweep-mma && step sweep-mma 180 python benchmarks/sweep_streams.py \
  --dtypes bf16 --kernels merge_bwd_mma --out "$work/sweep-mma.json"
# the stream gradient alone, its 8 fastest launches again at 2, 4, 8 updates per step and with its
# loop's loads copied ahead (2-3 stages): 108 per dtype (68 took 105 s for both in the fifth lease)
want sweep-grad && step sweep-grad 240 python benchmarks/sweep_streams.py \
  --dtypes bf16 fp32 --kernels stream_grad --out "$work/sweep-grad.json"
# the backwards (sums over C) only: both 2026-11-27 sweeps put the forwards at 1.18-1.28x the roofline
want sweep-streams && step sweep-streams 180 python benchmarks/sweep_streams.py \
  --dtypes bf16 fp32 --kernels merge_bwd pre_mix_bwd stream_grad --out "$work/sweep-streams.json"
want compile && step compile 240 "${bench[@]}" benchmarks/test_sinkhorn.py benchmarks/test_streams.py \
  benchmarks/test_layer_overhead.py -k "${MHC_COMPILE_CASES:-compile}"
stability_k=()  # MHC_STABILITY_CASES: a pytest -k, e.g. "training and mhc" for mHC's runs alone
[ -n "${MHC_STABILITY_CASES:-}" ] && stability_k=(-k "$MHC_STABILITY_CASES")
want stability-large && MHC_STABILITY_SCALE=large step stability-large 540 "${bench[@]}" \
  benchmarks/test_stability.py "${stability_k[@]}"

if [ ! -e "$work/$name.json" ]; then  # no benchmark step ran (tests or the profile alone)
  echo "no benchmark results (exit $status); logs${OUT:+ in $OUT/$name.tgz}"
  exit $status
fi
python - "$work/$name.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print(json.dumps({"targets": data["sinkhorn"]["targets"], "layer_overhead": data["layer_overhead"],
                  "activation_memory": data["activation_memory"], "connection": data["connection"],
                  "finetune_step": data.get("finetune_step"),
                  "streams": {k: {m: round(v, 3) if isinstance(v, float) else v for m, v in e.items()}
                              for k, e in data["streams"].items()}}, indent=1, default=str))
PY
echo "wrote benchmarks/results/$name.json (exit $status)"
exit $status
