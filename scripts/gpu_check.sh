#!/usr/bin/env bash
# On a GPU machine with torch preinstalled (e.g. the lent torch 2.11 machines): run the
# CUDA tests, then the benchmark on the GPU. A few minutes; everything goes to stdout.
# Needs only torch and pytest there: the package is laid out on PYTHONPATH, not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
site="$(mktemp -d)"
mkdir -p "$site/persample"
cp -r persample/*.py "$site/persample/"
cp -r ops "$site/persample/ops"
cp -r meta "$site/persample/meta"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py || status=$?
python3 -m persample.bench --device cuda --rounds 50 || status=$?
exit "$status"
