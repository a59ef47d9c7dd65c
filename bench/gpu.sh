#!/usr/bin/env bash
# Every GPU measurement of issue 6, side by side with its anchor, in one go (< 8 minutes on one H100/H200).
#   bash bench/gpu.sh | tee bench/gpu-results.txt
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "## training: GPT-2 124M, bf16, seq 1024, batch 16 (finetune vs HF Trainer)"
timeout 300 python bench/train_speed.py --preset gpt2 --device cuda --rounds 1
echo "## sampling: GPT-2 124M, bf16, batch 1 / 8 / 32 (finetune vs HF generate)"
timeout 150 python bench/generate_speed.py --device cuda --batches 1,8,32 --new-tokens 256
