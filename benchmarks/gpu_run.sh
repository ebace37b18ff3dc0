#!/usr/bin/env bash
# One device call (nvidia-h200 / h100): environment, GPU tests, then benchmarks, by part.
# Usage (on the device machine): GYRE_COMMIT=<sha> bash benchmarks/gpu_run.sh PART [PART ...]
#   parts: tests kernels profile throughput throughput-nohf prefix moe grammar spec flashinfer
# Optional wheels (xgrammar, flashinfer) are carried in .gpuwhl/ and installed into /tmp/site.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export GYRE_RESULTS=${OUT:-/tmp}/results
mkdir -p "$GYRE_RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
if ls .gpuwhl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-deps --target /tmp/site .gpuwhl/*.whl 2>&1 | tail -2
fi
[ -d /tmp/site ] && export PYTHONPATH=${PYTHONPATH:-}:/tmp/site
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for part in "$@"; do
  echo "== $part  $(date +%T)"
  case $part in
    tests) timeout 400 python3 -m pytest -q -x -m gpu tests/kernels tests/engine/test_gpu.py tests/weight_sync/test_gpu.py \
             -p no:cacheprovider 2>&1 | tail -15 ;;
    spec-tests) timeout 300 python3 -m pytest -q -x -m gpu tests/engine/test_spec_drafters.py tests/engine/test_spec.py tests/engine/test_spec_fused.py \
                  -p no:cacheprovider 2>&1 | tail -15 ;;
    kernels) timeout 120 python3 benchmarks/attention_kernels.py 2>&1 | tail -3 ;;
    profile) timeout 200 python3 benchmarks/profile_decode.py --batch 1 2>&1 | grep -v Warning | tail -30
             timeout 200 python3 benchmarks/profile_decode.py --batch 256 --n 16 --prompt-len 1024 --top 12 2>&1 | grep -v Warning | tail -16 ;;
    throughput) timeout 560 python3 benchmarks/throughput.py --shape llama3-8b 2>&1 | grep -v Warning | tail -4 ;;
    throughput-nohf) timeout 300 python3 benchmarks/throughput.py --shape llama3-8b --skip-hf 2>&1 | grep -v Warning | tail -4 ;;
    prefix) timeout 300 python3 benchmarks/prefix.py --shape llama3-8b 2>&1 | grep -v Warning | tail -3 ;;
    moe) timeout 300 python3 benchmarks/throughput.py --shape qwen3-30b-a3b --skip-hf --num-prompts 512 2>&1 | grep -v Warning | tail -3 ;;
    grammar) timeout 300 python3 benchmarks/grammar.py --shape llama3-8b 2>&1 | grep -v Warning | tail -3 ;;
    spec) timeout 560 python3 benchmarks/spec.py --work-dir /tmp/spec --data .gpudata/train.jsonl --target-size ${SPEC_SIZE:-medium} ${SPEC_ARGS:-} 2>&1 | grep -v Warning | tail -12 ;;
    flashinfer) timeout 400 python3 -m pytest -q -x -m gpu tests/kernels/test_flashinfer.py tests/engine/test_gpu.py \
                  -p no:cacheprovider 2>&1 | tail -15 ;;
    *) echo "unknown part $part" ;;
  esac
done
