#!/usr/bin/env bash
# On a GPU machine with torch preinstalled (e.g. the lent torch 2.11 machines): build the
# C++ library if it can, run the CUDA tests, the C++ path's tests and the Triton kernels'
# tests on the GPU, then the kernel-bound benchmark (Triton against ATen, ExpandedWeights
# and a copy, plus the routing crossover), the host-bound one and WRN-16-4's whole
# DP-SGD step. Budget: under 5 minutes on an H200 (each stage prints its time);
# everything goes to stdout.
# Needs only torch and pytest there (triton comes with torch's CUDA wheels): the package
# is laid out on PYTHONPATH, not installed.
# With $OUT set (the device tool): $OUT/tests.xml (pytest's JUnit report),
# $OUT/bench-kernels.json, $OUT/bench-cuda.json and $OUT/bench-model.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
site="$(mktemp -d)"
mkdir -p "$site/persample"
cp persample/*.py "$site/persample/"
cp -r ops "$site/persample/ops"
cp -r meta "$site/persample/meta"
stage() { echo "=== $1 (at ${SECONDS}s)"; }
# The C++ eager path, built against this machine's torch where a compiler is there
# (optional: without it the package runs its Python kernels). test_eager_fast_path.py
# runs it on CUDA tensors too.
stage "C++ library"
if python3 setup.py -q build_ext --inplace >"$site/build.log" 2>&1 \
        && cp persample/_C_torch*.so "$site/persample/"; then
    echo "C++ library built"
else
    echo "C++ library not built (tail of $site/build.log:)"; tail -n 5 "$site/build.log"
fi
# The checkout comes after the laid-out package (for torch_compile_tests.models), and
# python3 -P keeps the working directory, whose persample/ lacks ops/, off sys.path.
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import importlib.util
import torch
triton = importlib.util.find_spec("triton") and __import__("triton").__version__
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton or "not installed",
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
status=0
stage "tests"
python3 -P -m pytest -q -p no:cacheprovider -rs ${OUT:+--junitxml="$OUT/tests.xml"} \
    tests/test_cuda.py tests/test_eager_fast_path.py tests/test_triton.py || status=$?
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    stage "kernel-bound benchmark"
    python3 -P -m persample.bench --device cuda --kernels --rounds 20 \
        ${OUT:+--json "$OUT/bench-kernels.json"} || status=$?
    stage "host-bound benchmark"
    python3 -P -m persample.bench --device cuda --rounds 30 \
        --methods plain,persample,persample_grad_sample,expanded_weights \
        ${OUT:+--json "$OUT/bench-cuda.json"} || status=$?
    # One whole DP-SGD step of WRN-16-4 per method (batch 64; Opacus's rows are skipped
    # where it is not installed). Last, and bounded: inductor compiles two graphs first.
    stage "model benchmark"
    timeout 150 python3 -P -m persample.bench --model wrn16-4 --device cuda --rounds 10 \
        ${OUT:+--json "$OUT/bench-model.json"} || status=$?
else
    echo "no CUDA device: benchmarks skipped"
fi
stage "done"
exit "$status"
