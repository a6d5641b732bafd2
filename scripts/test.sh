#!/usr/bin/env bash
# Set up and run the tests, once per supported torch release, each run on two pytest
# workers (most of the suite's time is single-threaded tracing and compiling):
#   2.13.0 (CPU build): every test, then the eager ones without the C++ library, then the
#   numerics-heavy tests under the ATen CPU dispatch level that this CPU does not pick
#   (avx2 or default): float32 rounding differs with it (tests/error_model.py);
#   2.14.1 (CUDA build; its CUDA tests skip without a GPU): every test, with one thread
#   per worker, since float32 rounding also differs with the thread count;
#   2.11.0 (CUDA build; the GPU image's torch, the lowest declared): the ops, opcheck and
#   the Triton interpreter tests.
# The torch wheels of the later releases install in the background meanwhile (network
# and disk, not the two cores the tests need).
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
    tests/test_regressions.py tests/test_properties_errors.py tests/test_row_norm_ops.py
    tests/test_row_norm_errors.py tests/test_row_norm_modules.py)
# Tests whose float32 results run through ATen's, oneDNN's or MKL's CPU kernels, which
# differ in their last bits with the dispatch level and the thread count.
NUMERICS_TESTS=(tests/test_properties.py tests/test_regressions.py tests/test_dtypes.py
    tests/test_eager_fast_path.py tests/test_grad_sample.py tests/test_opacus.py
    tests/test_demo.py tests/test_bench_models.py::TestUpdates
    tests/test_row_norm_ops.py tests/test_row_norm_properties.py tests/test_row_norm_modules.py
    tests/test_opacus_norms.py
    torch_compile_tests/test_models.py torch_compile_tests/test_torch_func_compiled.py)
# torch 2.11.0: the ops and their checks, and the Triton kernels in the interpreter.
SUBSET_TESTS=(tests/test_group_norm.py tests/test_dtypes.py tests/test_errors.py
    tests/test_opcheck.py tests/test_eager_fast_path.py tests/test_regressions.py
    tests/test_properties.py tests/test_vmap.py tests/test_triton.py tests/test_triton_compile.py
    tests/test_row_norm_ops.py tests/test_row_norm_errors.py tests/test_row_norm_opcheck.py
    tests/test_triton_row_norm.py)

install_torch() {  # install_torch VERSION: the venv and torch alone
    local venv=".venv-torch$1"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$1" "setuptools>=77"
}

setup() {  # setup VERSION: the package, its C++ library built against that torch
    local venv=".venv-torch$1"
    echo "=== torch $1 ($venv) at ${SECONDS}s ==="
    install_torch "$1"
    # The model zoo (tests/test_model_zoo.py) on 2.14.1 only: the registry's torchvision
    # is a CUDA build whose ops do not load with 2.13.0's CPU build.
    local extras=test,opacus,demo,plot,onnx
    [[ "$1" == 2.14.1 ]] && extras+=,zoo
    [[ "$1" == 2.11.0 ]] && extras=test
    # No build isolation: setup.py builds the C++ eager fast path against this torch.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
        -e ".[$extras]" "torch==$1"  # torch pinned: no extra may upgrade it
}

# A failed (optional) build of the C++ library must fail the tests, not pass on the
# Python kernels alone (tests/test_eager_fast_path.py).
run() {  # run VERSION PYTEST-ARGS...
    local v="$1"; shift
    PERSAMPLE_REQUIRE_CPP=1 ".venv-torch$v/bin/python" -m pytest -q -n 2 --dist loadscope "$@"
}

# The ATen CPU dispatch level this machine does not pick itself: avx2 on an AVX-512 CPU,
# default on an AVX2 one (a level the CPU lacks would crash), none elsewhere.
other_capability() {
    case "$(".venv-torch$1/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" in
        AVX512) echo avx2 ;;
        AVX2) echo default ;;
    esac
}

other_dispatch_level() {  # other_dispatch_level VERSION
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
}

if [[ $everything -eq 0 ]]; then
    for v in "${versions[@]}"; do
        setup "$v"
        run "$v" "$@"
        PERSAMPLE_DISABLE_CPP=1 ".venv-torch$v/bin/python" -m pytest -q -n 2 "${PYTHON_KERNEL_TESTS[@]}"
    done
    exit 0
fi

prefetch_log="$(mktemp)"
( install_torch 2.14.1 && install_torch 2.11.0 ) >"$prefetch_log" 2>&1 &
prefetch=$!
setup 2.13.0
run 2.13.0 "$@"
PERSAMPLE_DISABLE_CPP=1 .venv-torch2.13.0/bin/python -m pytest -q -n 2 "${PYTHON_KERNEL_TESTS[@]}"
other_dispatch_level 2.13.0
wait "$prefetch" || { cat "$prefetch_log"; exit 1; }
setup 2.14.1
echo "--- torch 2.14.1: OMP_NUM_THREADS=1 ---"
OMP_NUM_THREADS=1 run 2.14.1 "$@"
setup 2.11.0
run 2.11.0 "${SUBSET_TESTS[@]}"
echo "=== done at ${SECONDS}s ==="
