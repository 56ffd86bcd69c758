#!/usr/bin/env bash
# The prepared GPU check: on a machine with an NVIDIA GPU and no internet, run the kernel tests
# natively (no interpreter), the kernel and layer benchmarks (under 5 minutes together) and the
# large stability suite, and write the results under benchmarks/results/ (and $OUT when set): one
# gpu-<name>-<time>.json and stability-large/. Needs only torch, triton, numpy, pytest,
# pytest-benchmark (matplotlib optional; no geomloss, no anndata). Steps are capped at 150 + 270 +
# 150 s so the whole check fits one 10-minute device command.  Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || python -m pip install --quiet --no-deps -e .
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stamp=$(date -u +%Y%m%dT%H%M%SZ)
work=$(mktemp -d)
status=0

echo "== kernel tests on $gpu (native)"
timeout 150 python -m pytest tests/mhc_kernels -q -x -p no:cacheprovider \
  --junitxml="$work/tests.xml" 2>&1 | tail -5 || status=1

echo "== benchmarks"
timeout 270 python -m pytest benchmarks/test_sinkhorn.py benchmarks/test_layer_overhead.py \
  benchmarks/test_streams.py \
  --benchmark-only -q -p no:cacheprovider --benchmark-json="$work/bench.json" \
  --benchmark-columns=median,iqr 2>&1 | tail -60 || status=1

echo "== stability suite, large scale"
MHC_STABILITY_SCALE=large timeout 150 python -m pytest benchmarks/test_stability.py --benchmark-only \
  -q -p no:cacheprovider --benchmark-columns=median 2>&1 | tail -8 || status=1

mkdir -p benchmarks/results
result="benchmarks/results/gpu-${gpu}-${stamp}.json"
python benchmarks/summarize.py "$work/bench.json" --out "$result" || status=1
python - "$work/tests.xml" "$result" <<'PY'
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
data = json.load(open(sys.argv[2]))
data["kernel_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
json.dump(data, open(sys.argv[2], "w"), indent=1, default=str)
print(json.dumps({"kernel_tests": data["kernel_tests"], "targets": data["sinkhorn"]["targets"],
                  "layer_overhead": data["layer_overhead"]}, indent=1))
PY
if [ -n "${OUT:-}" ]; then
  cp "$result" "$OUT/"
  cp -r benchmarks/results/stability-large "$OUT/" 2>/dev/null || true
fi
echo "wrote $result"
exit $status
