#!/usr/bin/env bash
# The GPU benchmarks of the performance issue, end to end, on a bare GPU machine with PyTorch.
#   tests/gpu/gpu_check.sh            DiT-XL/2 and DiT-B/2 training at per-GPU batch 32 and 128 on the CUDA
#                                     defaults (bf16 + SDPA + compile with CUDA graphs; MFU vs the dense bf16
#                                     peak), XL/2 250-step guided sampling throughput, and XL/2 peak memory
#                                     with and without gradient checkpointing;
#   tests/gpu/gpu_check.sh variants   the comparisons behind the CUDA defaults: compile modes (CUDA graphs),
#                                     the SDPA kernel and the batch, with profiles of where a step goes.
# Budget: under 8 minutes; each benchmark has its own time limit and a failed one does not stop the rest.
# Results: one JSON line per benchmark in bench/gpu_<suite>.jsonl ($OUT/... through the device tool).
#
# Python packages the harness needs beyond torch may travel as wheels in .whl/ (see the device notes);
# they are installed into /tmp/site first when present. Made with (pure-Python wheels, any platform):
#   .venv/bin/pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
#     fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0 submitit==1.5.4 \
#     hydra-submitit-launcher==1.2.0 torch-fidelity==0.4.0
set -uo pipefail
suite=${1:-check}
[[ $suite == check || $suite == variants ]] || { echo "gpu_check.sh: suite '$suite' is not one of check, variants" >&2; exit 2; }
cd "$(dirname "$0")/../.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
export HARNESS_CACHE_DIR="${HARNESS_CACHE_DIR:-/tmp/harness-cache}"
out="${OUT:-bench}"
log="$out/gpu_$suite.jsonl"
mkdir -p "$out"
budget=${GPU_CHECK_BUDGET_S:-450}
failed=0

bench() {  # bench LIMIT_S OVERRIDES... [--what ...] [--profile]
  local limit=$1; shift
  if (( SECONDS + 20 > budget )); then echo "SKIPPED (budget): $*"; failed=1; return; fi
  echo "=== [$SECONDS s] bench $*"
  timeout "$limit" python3 -m harness.cli bench --log "$log" experiment=imagenet256 trainer.device=cuda "$@" \
    | sed '/^{/,$d' || { echo "FAILED ($?): $*"; failed=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
if [[ $suite == check ]]; then
  bench 200 model=DiT-XL/2 trainer.global_batch_size=32 --what train
  bench 120 model=DiT-B/2 trainer.global_batch_size=32 --what train
  bench 150 model=DiT-XL/2 eval.batch_size=64 --what sample
  bench 60 model=DiT-XL/2 trainer.global_batch_size=32 trainer.compile=false --what train
  bench 60 model=DiT-XL/2 trainer.global_batch_size=32 trainer.compile=false trainer.grad_checkpointing=true --what train
  bench 120 model=DiT-XL/2 trainer.global_batch_size=128 --what train
  bench 100 model=DiT-B/2 trainer.global_batch_size=128 --what train
else
  bench 100 model=DiT-B/2 trainer.global_batch_size=32 trainer.compile_mode=default --what train --profile
  bench 100 model=DiT-B/2 trainer.global_batch_size=32 trainer.compile_mode=reduce-overhead --what train
  bench 140 model=DiT-XL/2 trainer.global_batch_size=32 trainer.compile_mode=reduce-overhead --what train --profile
  bench 100 model=DiT-B/2 trainer.global_batch_size=32 trainer.compile_mode=default trainer.attention=cudnn --what train
  bench 120 model=DiT-XL/2 trainer.global_batch_size=128 trainer.compile_mode=default --what train
fi
echo "[$SECONDS s] results: $log"
exit $failed
