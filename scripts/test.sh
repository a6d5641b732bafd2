#!/usr/bin/env bash
# Set up and run the tests, once per supported torch release:
#   2.13.0 (CPU build) and 2.14.1 (CUDA build; its CUDA tests skip without a GPU): every
#   test, then the eager ones without the C++ library;
#   2.13.0 again: the numerics-heavy tests under the ATen CPU dispatch level that this
#   CPU does not pick (avx2 or default), then with one thread: float32 rounding differs
#   with both (tests/error_model.py);
#   2.11.0 (CUDA build; the GPU image's torch, the lowest declared): the ops, opcheck
#   and the Triton interpreter tests.
# Usage: scripts/test.sh [torch-version ...] [-- pytest args]
#   Versions named on the command line run every test; pytest args go to those runs.
set -euo pipefail
cd "$(dirname "$0")/.."

versions=()
while [[ $# -gt 0 && "$1" != "--" ]]; do versions+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
everything=0  # the default: the full set above
[[ ${#versions[@]} -eq 0 ]] && { versions=(2.13.0 2.14.1); everything=1; }

# The eager tests without the C++ library: what a plain (isolated) install runs.
PYTHON_KERNEL_TESTS=(tests/test_group_norm.py tests/test_dtypes.py tests/test_dispatch.py
    tests/test_module.py tests/test_double_backward.py tests/test_eager_fast_path.py
    tests/test_regressions.py tests/test_properties_errors.py)
# Tests whose float32 results run through ATen's, oneDNN's or MKL's CPU kernels, which
# differ in their last bits with the dispatch level and the thread count.
NUMERICS_TESTS=(tests/test_properties.py tests/test_regressions.py tests/test_dtypes.py
    tests/test_eager_fast_path.py tests/test_grad_sample.py tests/test_opacus.py
    tests/test_demo.py tests/test_bench_models.py::TestUpdates
    torch_compile_tests/test_models.py torch_compile_tests/test_torch_func_compiled.py)
# torch 2.11.0: the ops and their checks, and the Triton kernels in the interpreter.
SUBSET_TESTS=(tests/test_group_norm.py tests/test_dtypes.py tests/test_errors.py
    tests/test_opcheck.py tests/test_eager_fast_path.py tests/test_regressions.py
    tests/test_properties.py tests/test_vmap.py tests/test_triton.py tests/test_triton_compile.py)

setup() {  # setup VERSION: the venv, torch and the package, its C++ library built against it
    local venv=".venv-torch$1"
    echo "=== torch $1 ($venv) ==="
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$1" "setuptools>=77"
    # The model zoo (tests/test_model_zoo.py) on 2.14.1 only: the registry's torchvision
    # is a CUDA build whose ops do not load with 2.13.0's CPU build.
    local extras=test,opacus,demo,plot,onnx
    [[ "$1" == 2.14.1 ]] && extras+=,zoo
    # No build isolation: setup.py builds the C++ eager fast path against this torch.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
        -e ".[$extras]" "torch==$1"  # torch pinned: no extra may upgrade it
}

# A failed (optional) build of the C++ library must fail the tests, not pass on the
# Python kernels alone (tests/test_eager_fast_path.py).
run() {  # run VERSION PYTEST-ARGS...
    local v="$1"; shift
    PERSAMPLE_REQUIRE_CPP=1 ".venv-torch$v/bin/python" -m pytest -q "$@"
}

# The ATen CPU dispatch level this machine does not pick itself: avx2 on an AVX-512 CPU,
# default on an AVX2 one (a level the CPU lacks would crash), none elsewhere.
other_capability() {
    case "$(".venv-torch$1/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" in
        AVX512) echo avx2 ;;
        AVX2) echo default ;;
    esac
}

machine_variants() {  # machine_variants VERSION
    local cap cache
    cap="$(other_capability "$1")"
    if [[ -n "$cap" ]]; then
        echo "--- torch $1: ATEN_CPU_CAPABILITY=$cap ---"
        # Inductor's cache keys leave out the dispatch level: kernels generated for one
        # level and compiled for another abort. So this level gets a cache of its own.
        cache="$(mktemp -d)"
        ATEN_CPU_CAPABILITY="$cap" TORCHINDUCTOR_CACHE_DIR="$cache" run "$1" "${NUMERICS_TESTS[@]}"
        rm -rf "$cache"
    else
        echo "--- torch $1: no second ATen dispatch level on this CPU ---"
    fi
    echo "--- torch $1: OMP_NUM_THREADS=1 ---"
    OMP_NUM_THREADS=1 run "$1" "${NUMERICS_TESTS[@]}"
}

for v in "${versions[@]}"; do
    setup "$v"
    run "$v" "$@"
    PERSAMPLE_DISABLE_CPP=1 ".venv-torch$v/bin/python" -m pytest -q "${PYTHON_KERNEL_TESTS[@]}"
done
if [[ $everything -eq 1 ]]; then
    machine_variants "${versions[0]}"
    setup 2.11.0
    run 2.11.0 "${SUBSET_TESTS[@]}"
fi
