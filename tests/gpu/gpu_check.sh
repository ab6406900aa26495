#!/usr/bin/env bash
# The GPU benchmarks of the performance issue, end to end, on a bare GPU machine with PyTorch:
# DiT-XL/2 and DiT-B/2 training at per-GPU batch 32 (bf16 + SDPA, MFU vs the dense bf16 peak),
# XL/2 peak memory with and without gradient checkpointing, and 250-step guided sampling throughput.
# Budget: under 8 minutes. Results: bench/gpu_check.jsonl (and $OUT when run through the device tool).
#
# Python packages the harness needs beyond torch may travel as wheels in .whl/ (see the device notes);
# they are installed into /tmp/site first when present.
set -euo pipefail
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
log="${OUT:-bench}/gpu_check.jsonl"
mkdir -p "$(dirname "$log")"
bench() { timeout 150 python3 -m harness.cli bench --log "$log" experiment=imagenet256 trainer.device=cuda "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bench model=DiT-XL/2 trainer.global_batch_size=32 eval.batch_size=64 --what train sample
bench model=DiT-XL/2 trainer.global_batch_size=32 trainer.grad_checkpointing=true --what train
bench model=DiT-B/2 trainer.global_batch_size=32 --what train
bench model=DiT-B/2 trainer.global_batch_size=32 trainer.compile=false --what train
echo "results: $log"
