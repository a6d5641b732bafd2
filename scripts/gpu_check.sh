#!/usr/bin/env bash
# On a GPU machine with torch preinstalled (e.g. the lent torch 2.11 machines): build the
# C++ library if it can, run the CUDA tests and the C++ path's tests, then the benchmark
# on the GPU. A few minutes; everything goes to stdout.
# Needs only torch and pytest there: the package is laid out on PYTHONPATH, not installed.
# With $OUT set (the device tool), the benchmark's figures also go to $OUT/bench-cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
site="$(mktemp -d)"
mkdir -p "$site/persample"
cp persample/*.py "$site/persample/"
cp -r ops "$site/persample/ops"
cp -r meta "$site/persample/meta"
# The C++ eager path, built against this machine's torch where a compiler is there
# (optional: without it the package runs its Python kernels). test_eager_fast_path.py
# runs it on CUDA tensors too.
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
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
status=0
python3 -P -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_eager_fast_path.py || status=$?
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    python3 -P -m persample.bench --device cuda --rounds 50 ${OUT:+--json "$OUT/bench-cuda.json"} || status=$?
else
    echo "no CUDA device: benchmark skipped"
fi
exit "$status"
