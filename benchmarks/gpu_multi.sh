#!/usr/bin/env bash
# One device call on nvidia-h200-x4 (or x2): multi-GPU tests and benchmarks (#5 weight sync, #12 MoE).
# Usage (on the device machine): GYRE_COMMIT=<sha> bash benchmarks/gpu_multi.sh sync|moe [num_gpus]
# (two calls on the same warm machine: each stays under the 10-minute command limit)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export GYRE_RESULTS=${OUT:-/tmp}/results
part=${1:-sync}
gpus=${2:-4}
mkdir -p "$GYRE_RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ "$part" = sync ]; then
echo "== weight-sync GPU tests"; timeout 240 python3 -m pytest -q -x -m gpu tests/weight_sync/test_gpu.py -p no:cacheprovider 2>&1 | tail -8
echo "== weight-sync benchmark"; timeout 240 python3 benchmarks/weight_sync.py --gpu 2>&1 | grep -v Warning | tail -4
fi
if [ "$part" = moe ]; then
echo "== moe 2 GPUs"; CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 benchmarks/moe.py --gpus 2 2>&1 | grep -v Warning | tail -4
if [ "$gpus" -ge 4 ]; then echo "== moe 4 GPUs"; timeout 200 python3 benchmarks/moe.py --gpus 4 2>&1 | grep -v Warning | tail -4; fi
fi
