#!/usr/bin/env bash
# Check the plugin against vLLM 0.33 (its CUDA build imports without a GPU) in a separate virtualenv: the checks of
# scripts/check_vllm_version.py (plugin registration, dtypes, backends, selection, connector signatures).
# Usage: bash scripts/check_vllm_033.sh [VENV_DIR]   (default: .venv-vllm033 in the repository; ~10 GB download)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-vllm033}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "vllm==0.33.0" zstandard
"${pip[@]}" install --no-deps --force-reinstall "$repo"  # a built copy, not editable: the repo's .venv is untouched
cd /tmp  # import the installed copy, not the repository's sources
"$venv/bin/python" "$repo/scripts/check_vllm_version.py"
