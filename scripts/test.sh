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
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$v"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,opacus,demo,plot]"
    "$venv/bin/python" -m pytest -q "$@"
done
