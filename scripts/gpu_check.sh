#!/usr/bin/env bash
# The CUDA checks CI cannot run (it has no GPU): BN parity (Triton, compiled, eager) and CUDA-graph
# training on the device, the BN benchmark per backend and layout, the epoch benchmark (CUDA graphs
# on and off, fp32 and bf16), TensorBoard logging, and the lr_sensitivity preset with 1 and 4 parallel jobs.
# Usage: BNEXP_DATA_DIR=/path/to/data scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
out="${1:-results/bench}"
mkdir -p "$out"
py="${PYTHON:-python3}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
"$py" -m pytest tests/test_gpu.py tests/test_gpu_engine.py tests/test_nn_parity.py tests/test_nn_triton.py -q -p no:cacheprovider
"$py" -m bnexp bench bn --device cuda --backends triton,compiled,eager --out "$out"
"$py" -m bnexp bench bn --device cuda --backends triton,compiled --channels-last --out "$out/channels_last"
"$py" -m bnexp bench epoch --device cuda --out "$out"
"$py" -m bnexp bench epoch --device cuda --precision bf16 --channels-last --out "$out/bf16"
"$py" -m bnexp bench log --device cuda --out "$out"
for jobs in 4 1; do
    tmp=$(mktemp -d)
    start=$(date +%s.%N)
    "$py" -m bnexp sweep --preset lr_sensitivity device=cuda results_dir="$tmp" --jobs "$jobs" | tail -1
    echo "lr_sensitivity --jobs $jobs: $(echo "$(date +%s.%N) - $start" | bc) s wall"
    rm -rf "$tmp"
done
