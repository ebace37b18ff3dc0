#!/usr/bin/env bash
# One device call: environment, GPU kernel tests, GPU engine tests, then the benchmarks.
# Usage (on the device machine): bash benchmarks/gpu_run.sh [throughput|moe|all]
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export GYRE_RESULTS=${OUT:-/tmp}/results
what=${1:-all}
mkdir -p "$GYRE_RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout 420 python3 -m pytest -q -x -m gpu tests/kernels tests/engine/test_gpu.py -p no:cacheprovider 2>&1 | tail -25
fi
if [ "$what" = all ] || [ "$what" = throughput ]; then
  timeout 900 python3 benchmarks/throughput.py --shape llama3-8b 2>&1 | grep -v Warning | tail -5
fi
if [ "$what" = moe ]; then
  timeout 900 python3 benchmarks/throughput.py --shape qwen3-30b-a3b --skip-hf --num-prompts 512 2>&1 | tail -5
fi
