#!/usr/bin/env bash
# Set up and run every test, once per supported torch release:
#   2.13.0 (CPU build) and 2.14.1 (CUDA build; its CUDA tests skip without a GPU).
# Usage: scripts/test.sh [torch-version ...] [-- pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

versions=()
while [[ $# -gt 0 && "$1" != "--" ]]; do versions+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#versions[@]} -eq 0 ]] && versions=(2.13.0 2.14.1)

for v in "${versions[@]}"; do
    venv=".venv-torch$v"
    echo "=== torch $v ($venv) ==="
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$v" "setuptools>=77"
    # No build isolation: setup.py builds the C++ eager fast path against this torch.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
        -e ".[test,opacus,demo,plot,onnx]"
    # A failed (optional) build of the C++ library must fail the tests, not pass on the
    # Python kernels alone (tests/test_eager_fast_path.py).
    PERSAMPLE_REQUIRE_CPP=1 "$venv/bin/python" -m pytest -q "$@"
    # The eager tests again without the library: what a plain (isolated) install runs.
    PERSAMPLE_DISABLE_CPP=1 "$venv/bin/python" -m pytest -q tests/test_group_norm.py \
        tests/test_dtypes.py tests/test_dispatch.py tests/test_module.py \
        tests/test_double_backward.py tests/test_eager_fast_path.py \
        tests/test_regressions.py tests/test_properties_errors.py
done
