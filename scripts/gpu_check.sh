#!/usr/bin/env bash
# On a GPU machine with torch preinstalled (e.g. the lent torch 2.11 machines): run the
# CUDA tests, then the benchmark on the GPU. A few minutes; everything goes to stdout.
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
# The checkout comes after the laid-out package (for torch_compile_tests.models), and
# python3 -P keeps the working directory, whose persample/ lacks ops/, off sys.path.
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
status=0
python3 -P -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py || status=$?
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    python3 -P -m persample.bench --device cuda --rounds 50 ${OUT:+--json "$OUT/bench-cuda.json"} || status=$?
else
    echo "no CUDA device: benchmark skipped"
fi
exit "$status"
