#!/usr/bin/env bash
# The GPU benchmarks of the performance issue, end to end, on a bare GPU machine with PyTorch.
#   tests/gpu/gpu_check.sh            DiT-XL/2 and DiT-B/2 training at per-GPU batch 32 and at a large batch
#                                     (XL/2 320 on an H200, 128 elsewhere; B/2 512) on the CUDA defaults (bf16 + SDPA + compile with
#                                     CUDA graphs; MFU vs the dense bf16 peak), XL/2 250-step guided sampling
#                                     throughput, and XL/2 peak memory with and without gradient checkpointing;
#   tests/gpu/gpu_check.sh variants   where a step goes and what changes it: profiles with the GPU time by
#                                     kernel kind, the batch, the SDPA kernel, and the real train loop
#                                     (`harness train` on a synthetic latent cache) against `harness bench`;
#   tests/gpu/gpu_check.sh autotune   DiT-XL/2 in the default compile mode, then with trainer.compile_tuning
#                                     (Inductor tunes its elementwise and reduction kernels): on a card with
#                                     >= 120 GB (H200) at batch 256 (profiled), 320, 256 with a bf16 residual
#                                     stream, and 256 tuned (about 9 minutes: give it GPU_CHECK_BUDGET_S=560);
#                                     elsewhere at batch 128, tuned, and a profile at batch 32. (max-autotune's GEMM search
#                                     ran past 260 s on an H200 and chose cuBLAS for XL/2's large GEMMs.)
#   tests/gpu/gpu_check.sh profile    DiT-XL/2 at batch 32 profiled kernel by kernel, with the code Inductor
#                                     generated for its step packed into $OUT/inductor_code.tgz (where the
#                                     elementwise time goes, and what each fused kernel reads and writes).
#   tests/gpu/gpu_check.sh fsdp       DiT-XL/2 trained by the train app under DDP, then under FSDP, two processes
#                                     with one GPU each, 32 per GPU: logged img/s and peak memory per window (what
#                                     sharding costs and saves). FSDP in one process is refused (nothing to shard
#                                     across) and NCCL will not put two ranks on one GPU, so it needs two GPUs.
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
[[ $suite =~ ^(check|variants|autotune|profile|fsdp)$ ]] || { echo "gpu_check.sh: suite '$suite' is not one of check, variants, autotune, profile, fsdp" >&2; exit 2; }
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
device=${GPU_CHECK_DEVICE:-cuda}  # cpu runs the mechanics here, slowly
failed=0

bench() {  # bench LIMIT_S OVERRIDES... [--what ...] [--profile]
  local limit=$1; shift
  if (( SECONDS + 20 > budget )); then echo "SKIPPED (budget): $*"; failed=1; return; fi
  echo "=== [$SECONDS s] bench $*"
  timeout "$limit" python3 -m harness.cli bench --log "$log" experiment=imagenet256 trainer.device=$device "$@" \
    | sed '/^{/,$d' || { echo "FAILED ($?): $*"; failed=1; }
}

train_loop() {  # [NPROC=N] train_loop LIMIT_S OVERRIDES...: the train app itself (N processes under torchrun),
  local limit=$1; shift                    # its logged img/s, MFU and peak memory per window
  if (( SECONDS + 30 > budget )); then echo "SKIPPED (budget): train $*"; failed=1; return; fi
  echo "=== [$SECONDS s] train $*"
  [[ -f /tmp/harness-latents/index.json ]] || python3 -c "from harness.data import write_synthetic_latent_cache as w; \
w('/tmp/harness-latents', num_images=8192, latent_shape=(4, 32, 32), num_classes=1000, shard_size=2048)"
  local run=/tmp/harness-train-$SECONDS
  local launch=(python3)
  [[ ${NPROC:-1} -gt 1 ]] && launch=(python3 -m torch.distributed.run --nproc_per_node="$NPROC")
  timeout "$limit" "${launch[@]}" -m harness.cli train experiment=imagenet256 trainer.device=$device data.root=/tmp/harness-latents \
    eval.every=null trainer.ckpt_every=100000 trainer.log_every=100 "hydra.run.dir=$run" "$@" 2>&1 | grep -v Warning \
    || { echo "FAILED ($?): train $*"; failed=1; }
  [[ -f $run/metrics.jsonl ]] && python3 -c "import json, sys
for line in open(sys.argv[1]): print(json.dumps({'train_loop': sys.argv[2], 'row': json.loads(line)}))" \
    "$run/metrics.jsonl" "$*" >> "$log"
}

gpu_memory_mib() {  # the first GPU's memory; 0 without one
  local mib
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc 0-9)
  echo "${mib:-0}"
}
h200_sized=$(( $(gpu_memory_mib) >= 120000 ))  # 1 on a card with room for XL/2 at batch 320 (111 GiB, the dry run's estimate)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
if [[ $suite == check ]]; then
  bench 200 model=DiT-XL/2 trainer.global_batch_size=32 --what train
  bench 120 model=DiT-B/2 trainer.global_batch_size=32 --what train
  bench 150 model=DiT-XL/2 eval.batch_size=64 --what sample
  bench 60 model=DiT-XL/2 trainer.global_batch_size=32 trainer.compile=false --what train
  bench 60 model=DiT-XL/2 trainer.global_batch_size=32 trainer.compile=false trainer.grad_checkpointing=true --what train
  bench 120 model=DiT-XL/2 trainer.global_batch_size=$( ((h200_sized)) && echo 320 || echo 128) --what train
  bench 100 model=DiT-B/2 trainer.global_batch_size=512 --what train
elif [[ $suite == profile ]]; then
  export TORCHINDUCTOR_CACHE_DIR=/tmp/harness-inductor-$$
  python3 -c "import torch._inductor.config as c; print('inductor mix_order_reduction', getattr(c.triton, 'mix_order_reduction', 'absent'))"
  bench 200 model=DiT-XL/2 trainer.global_batch_size=32 --what train --profile
  grep -rl --include='*.py' 'async_compile.triton(' "$TORCHINDUCTOR_CACHE_DIR" | tar czf "$out/inductor_code.tgz" -T - \
    && echo "generated code: $out/inductor_code.tgz"
elif [[ $suite == fsdp ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [[ $device == cuda && $gpus -lt 2 ]]; then
    echo "SKIPPED: FSDP needs two processes on two GPUs; this machine has $gpus"
  else
    for parallel in ddp fsdp; do
      NPROC=2 train_loop 200 model=DiT-XL/2 trainer.global_batch_size=64 trainer.max_steps=300 trainer.parallel=$parallel
    done
  fi
elif [[ $suite == autotune ]]; then  # kernel tuning compiles for minutes: the limits allow for it
  if ((h200_sized)); then
    bench 150 model=DiT-XL/2 trainer.global_batch_size=256 --what train --profile
    bench 150 model=DiT-XL/2 trainer.global_batch_size=320 --what train
    bench 150 model=DiT-XL/2 trainer.global_batch_size=256 trainer.residual_precision=bf16 --what train
    bench 280 model=DiT-XL/2 trainer.global_batch_size=256 trainer.compile_tuning=true --what train
  else
    bench 120 model=DiT-XL/2 trainer.global_batch_size=128 --what train
    bench 280 model=DiT-XL/2 trainer.global_batch_size=128 trainer.compile_tuning=true --what train
    bench 150 model=DiT-XL/2 trainer.global_batch_size=32 --what train --profile
  fi
else
  bench 90 model=DiT-B/2 trainer.global_batch_size=32 --what train --profile
  bench 150 model=DiT-XL/2 trainer.global_batch_size=32 --what train --profile
  bench 90 model=DiT-B/2 trainer.global_batch_size=256 --what train
  bench 120 model=DiT-XL/2 trainer.global_batch_size=128 --what train
  train_loop 100 model=DiT-B/2 trainer.global_batch_size=32 trainer.max_steps=400
  bench 100 model=DiT-XL/2 trainer.global_batch_size=128 trainer.attention=flash --what train
fi
echo "[$SECONDS s] results: $log"
exit $failed
