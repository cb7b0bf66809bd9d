#!/usr/bin/env bash
# The four figures that a refactor must not move (issue 18): batch-1 and batch-64 decode (mini), the mini
# training step, the full-size layer. Run from the repository root on the GPU machine:
#   bash bench/regression.sh            (prints one block per benchmark; full logs under $OUT when set)
set -uo pipefail
export PYTHONPATH=src PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python bench/decode.py --batch 1 64 --spec 0 --no-transformers --budget-s 200 > "$OUT/decode.log" 2>&1
tail -n 12 "$OUT/decode.log"
python bench/train_step.py --no-transformers > "$OUT/train_step.log" 2>&1
tail -n 10 "$OUT/train_step.log"
python bench/layer.py --no-transformers > "$OUT/layer.log" 2>&1
tail -n 10 "$OUT/layer.log"
