#!/usr/bin/env bash
# GPU check of issue 15, item 1: hf_packed_inputs keeps packed sequences apart on CUDA.
#
#   bash benchmarks/gpu_hf.sh        # on one GPU: about 1-3 minutes (flex attention compiles)
#
# Runs tests/test_hf.py on the GPU: every packed sequence's logits against its unpacked run
# (fp32, max |diff| <= 1e-5) for Llama, Qwen2 (a full and a sliding layer) and Mistral
# (sliding window) with eager, sdpa and flex attention, the gradients, the refusals, and —
# where flash-attn is installed — flash_attention_2 varlen in bf16 against the unpacked run
# (<= 0.05, while attention across sequences moves the logits by more). Needs torch,
# transformers, pytest and hypothesis in the image. The log goes to $OUT/hf_gpu.log when
# $OUT is set.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
LOG="${OUT:-${TMPDIR:-/tmp}}/hf_gpu.log"
mkdir -p "$(dirname "$LOG")"
{
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA: the CPU checks only)')"
    python3 -c "from transformers.utils import is_flash_attn_2_available as a; print('flash-attn 2 available:', a())"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_hf.py
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
