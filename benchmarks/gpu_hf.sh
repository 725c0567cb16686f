#!/usr/bin/env bash
# GPU checks of issue 15, item 1 (hf_packed_inputs keeps packed sequences apart on CUDA) and
# issue 11, item 1 (the shared attention kernels: strategies/kernels, used by the runtime and
# by calibration, against the dense reference on CUDA in bf16).
#
#   bash benchmarks/gpu_hf.sh        # on one GPU: about 1-3 minutes (flex attention compiles)
#
# Runs tests/test_hf.py on the GPU: every packed sequence's logits against its unpacked run
# (fp32, max |diff| <= 1e-5) for Llama, Qwen2 (a full and a sliding layer) and Mistral
# (sliding window) with eager, sdpa and flex attention, the gradients, the refusals, and —
# where flash-attn is installed — flash_attention_2 varlen in bf16 against the unpacked run
# (<= 0.05, while attention across sequences moves the logits by more). Needs torch,
# transformers, pytest and hypothesis in the image. The log goes to $OUT/hf_gpu.log when
# $OUT is set. Also tests/test_kernels_attention.py, test_kernels_segments.py and
# test_decoder.py: every kernel available on the device (flash_attn when installed, torch's
# varlen_attn, SDPA limited to flash/efficient) vs the dense masked reference, forward and
# gradients, and the calibration decoder on the kernel the runtime chooses.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
LOG="${OUT:-${TMPDIR:-/tmp}}/hf_gpu.log"
mkdir -p "$(dirname "$LOG")"
{
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA: the CPU checks only)')"
    python3 -c "from transformers.utils import is_flash_attn_2_available as a; print('flash-attn 2 available:', a())"
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_hf.py tests/test_kernels_attention.py \
        tests/test_kernels_segments.py tests/test_decoder.py
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
