#!/usr/bin/env bash
# The GPU check, in stages that each fit one short command on a lent GPU machine (torch
# preinstalled there: the lent H200 runs torch 2.11 and triton 3.6), most important
# figures first. Needs only torch, triton and pytest there: the package is laid out on
# PYTHONPATH, not installed.
#
#   scripts/gpu_check.sh 1 OUTDIR   (~4 min) a float64 correctness sweep of the Triton
#       kernels on the GPU, a sweep of their geometry knobs, then the kernel-bound suite
#       under the best: kernel-only times and bandwidth, end-to-end steps against
#       nn.GroupNorm and ExpandedWeights. Writes OUTDIR/bench-kernels.json.
#   scripts/gpu_check.sh 2 OUTDIR   (~4 min) builds the C++ library if it can, times a
#       step's host time layer by layer (persample.bench.host), runs the CUDA, Triton
#       and transform tests on the GPU (OUTDIR/tests.xml), then the host-bound suite
#       (OUTDIR/bench-cuda.json).
#   scripts/gpu_check.sh 3 OUTDIR   (~3 min) the row norms (LayerNorm, RMSNorm): their
#       Triton tests on the GPU (OUTDIR/tests-row.xml: the float64 sweep), then their
#       kernel-bound suites (OUTDIR/bench-row-kernels-{layer_norm,rms_norm}.json).
#
# Each stage prints its time; everything else goes to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
stage_arg="${1:?usage: scripts/gpu_check.sh 1|2|3 OUTDIR}"
out="${2:?usage: scripts/gpu_check.sh 1|2|3 OUTDIR}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
site="$(mktemp -d)"
mkdir -p "$site/persample"
cp persample/*.py "$site/persample/"
cp -r persample/bench "$site/persample/bench"
cp -r persample/models "$site/persample/models"
cp -r ops "$site/persample/ops"
cp -r meta "$site/persample/meta"
stage() { echo "=== $1 (at ${SECONDS}s)"; }
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
if [[ "$stage_arg" == 1 ]]; then
    stage "kernel-bound suite (check, tune, measure)"
    python3 -P -m persample.bench --device cuda --kernels --check --tune --rounds 10 \
        --json "$out/bench-kernels.json" || status=$?
elif [[ "$stage_arg" == 3 ]]; then
    stage "row-norm Triton tests"
    python3 -P -m pytest -q -p no:cacheprovider -rs --junitxml="$out/tests-row.xml" \
        tests/test_triton_row_norm.py || status=$?
    for op in layer_norm rms_norm; do
        stage "row-norm kernel-bound suite: $op"
        python3 -P -m persample.bench --device cuda --kernels --op "$op" --rounds 10 \
            --json "$out/bench-row-kernels-$op.json" || status=$?
    done
else
    # The C++ eager path, built against this machine's torch where a compiler is there
    # (optional: without it the package runs its Python kernels).
    stage "C++ library"
    if python3 setup.py -q build_ext --inplace >"$site/build.log" 2>&1 \
            && cp persample/_C_torch*.so "$site/persample/"; then
        echo "C++ library built"
    else
        echo "C++ library not built (tail of $site/build.log:)"; tail -n 5 "$site/build.log"
    fi
    stage "host time of a step, layer by layer"
    python3 -P -m persample.bench.host || status=$?
    stage "tests"
    python3 -P -m pytest -q -p no:cacheprovider -rs --junitxml="$out/tests.xml" \
        tests/test_triton.py tests/test_cuda.py tests/test_eager_fast_path.py || status=$?
    stage "host-bound suite"
    python3 -P -m persample.bench --device cuda --rounds 30 \
        --methods plain,persample,persample_grad_sample,expanded_weights \
        --json "$out/bench-cuda.json" || status=$?
fi
stage "done"
exit "$status"
