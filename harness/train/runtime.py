"""Where and how the model runs: this process's place in the job (device, distributed setup), the fast paths
(precision, torch.compile, the attention kernel, TF32), and the inference forward that training, evaluation and
`harness bench` share; plus the throughput figures (TFLOP/s, MFU, peak memory) that say how well it runs."""

from __future__ import annotations

import os
import platform
import resource
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import submitit
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.config import resolve_device
from harness.errors import require

# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place in the job: rank, world size, the device it trains on, and a CPU (gloo) group for
    host-side flags when the default group is NCCL."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    host_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank, so all ranks take the same branch at the same step.
        The flag travels over a CPU group: agreeing on it never waits for the GPU work queued before it."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([int(bool(flag))])
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())


def setup_distributed(device_pref: str = "auto") -> Dist:
    """Join the process group started by torchrun or by a multi-task submitit/SLURM job."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ and "SUBMITIT_FOLDER" in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, "trainer.device")
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    host_group = None
    if world_size > 1:
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        if torch_dist.get_backend() != "gloo":
            host_group = torch_dist.new_group(backend="gloo")
    return Dist(rank, world_size, local_rank, device, host_group)


def check_parallel(tc: DictConfig, world_size: int) -> None:
    """The job's process count fits the config: checked before a run writes anything. A checkpoint of any world
    size loads at any other (torch.distributed.checkpoint reshards), but each rank's slice of the global batch
    must be whole, and FSDP has nothing to shard across in one process."""
    require(tc.parallel != "fsdp" or world_size > 1,
            f"trainer.parallel=fsdp needs more than one process (this job has {world_size}): start it with "
            "torchrun --nproc_per_node=N, or use trainer.parallel=ddp")
    require(tc.global_batch_size % world_size == 0,
            f"trainer.global_batch_size={tc.global_batch_size} is not divisible by the world size {world_size}: "
            "the run's batches (and its checkpoints' data position) cannot be split across that many processes")


def fully_shard_training(model: torch.nn.Module, ema: torch.nn.Module, tc: DictConfig, dist: Dist) -> None:
    """FSDP2 in place: each transformer block, then the root (the embedders and final layer), of the model and
    of the EMA, over all ranks, so the EMA's shards sit on the rank that holds the same model shards.

    The model's sharded (master) weights, gradients and AdamW state are fp32; the policy follows
    trainer.precision: under bf16 the blocks gather and compute with bf16 weights and gradients are reduced in
    fp32; under fp32 (the CPU default) it is fp32 throughout. Both run on CPU with gloo (docs/reliability.md has
    the measured differences from DDP). The EMA stays fp32 and never runs a forward while sharded (evaluation
    samples from a gathered copy: `step.gather_full_ema`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    bf16 = fast_path_settings(tc, dist.device, dist.world_size)["precision"] == "bf16"
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for module, policy in ((model, compute), (ema, MixedPrecisionPolicy())):
        for block in module.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)


# ----------------------------------------------------------------------------- fast paths


def fast_path_settings(tc: DictConfig, device: torch.device, world_size: int = 1, sampling: bool = False) -> dict:
    """Resolve `auto` fast paths per device: bf16 autocast and torch.compile on CUDA; fp32 eager on CPU,
    where `harness bench` shows neither pays for a small DiT. CUDA graphs (compile mode reduce-overhead) for
    one-process CUDA training, where the H100 benchmark shows them paying (README); under DDP and for
    `sampling` they are unmeasured. The SDPA kernel stays PyTorch's choice unless pinned."""
    on_gpu = device.type == "cuda"
    precision = ("bf16" if on_gpu else "fp32") if tc.precision == "auto" else str(tc.precision)
    compile_ = on_gpu if tc.compile == "auto" else bool(tc.compile)
    mode = str(tc.compile_mode)
    if mode == "auto":
        mode = "reduce-overhead" if on_gpu and world_size == 1 and not sampling else "default"
    require(on_gpu or tc.attention in ("auto", "flash", "math"),
            f"trainer.attention={tc.attention} needs CUDA; on CPU use auto, flash or math")
    return {"precision": precision, "compile": compile_, "compile_mode": mode,
            "compile_tuning": bool(tc.compile_tuning), "attention": str(tc.attention)}


def compiled(model: torch.nn.Module, fast: dict):
    """`model` under torch.compile in the configured mode when the fast paths say so, else `model` itself.
    With `compile_tuning`, Inductor also benchmarks launch configs for its elementwise and reduction
    kernels (coordinate descent): what max-autotune does besides GEMM autotuning, which on an H200 chose
    cuBLAS over its own templates for XL/2 anyway and compiled for over 4 minutes (README, performance)."""
    if not fast["compile"]:
        return model
    if not fast["compile_tuning"]:
        return torch.compile(model, mode=None if fast["compile_mode"] == "default" else fast["compile_mode"])
    # torch.compile takes a mode or options, not both: the mode's own options plus the tuning
    options = {**torch._inductor.list_mode_options(fast["compile_mode"]),
               "coordinate_descent_tuning": True, "max_autotune_pointwise": True}
    return torch.compile(model, options=options)


def apply_matmul_settings(tc: DictConfig, device: torch.device) -> None:
    """TF32 tensor cores for the fp32 matmuls and convolutions that autocast leaves in fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tc.tf32)
        torch.backends.cudnn.allow_tf32 = bool(tc.tf32)


def attention_kernel(name: str):
    """A context pinning scaled_dot_product_attention to one kernel; `auto` leaves the choice to PyTorch."""
    if name == "auto":
        return nullcontext()
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name])


def autocast_forward(train_model, model: torch.nn.Module, fast: dict, device: torch.device):
    """`train_model(x, t, y)` under bf16 autocast when configured and the configured SDPA kernel, returning fp32
    for the loss."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if fast["precision"] == "bf16" else nullcontext()

    def forward(x, t, y, **kwargs):
        with autocast, attention_kernel(fast["attention"]):
            out = train_model(x, t, y, **kwargs)
        return out.float()

    forward.learn_sigma = model.learn_sigma
    forward.num_classes = model.num_classes
    return forward


def training_forward(model: torch.nn.Module, tc: DictConfig, dist: Dist) -> tuple:
    """(forward, fast-path settings) of the train loop: `model` compiled as configured, under DDP with more than
    one process (an FSDP model is sharded already: `fully_shard_training`), called under autocast."""
    fast = fast_path_settings(tc, dist.device, dist.world_size)
    train_model = compiled(model, fast)
    if dist.world_size > 1 and tc.parallel == "ddp":
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            bucket_cap_mb=float(tc.ddp_bucket_mb), gradient_as_bucket_view=True)
    return autocast_forward(train_model, model, fast, dist.device), fast


class InferenceForward(torch.nn.Module):
    """`module(x, t, y)` as sampling calls it: on the training fast paths (compile, bf16 autocast with fp32 out,
    the SDPA kernel) and cut into calls of at most `max_batch` samples. With `max_batch="auto"` a call runs
    whole and, on CUDA out-of-memory, again in halves (remembered for later calls). The noise is drawn outside
    the model, so the samples never depend on how the calls were cut, i.e. on the device's memory."""

    def __init__(self, module: torch.nn.Module, fast: dict, device: torch.device, max_batch: int | str = "auto"):
        super().__init__()
        self.module = module
        self.fast, self.device = fast, device
        self.adaptive = max_batch == "auto"
        self.chunk = None if self.adaptive else int(max_batch)
        # A plain attribute, not a submodule: the compiled wrapper must not register the weights twice.
        object.__setattr__(self, "_call", autocast_forward(compiled(module, fast), module, fast, device))

    def _run(self, x, t, y):
        if x.is_cuda:  # CUDA graphs only there (train_step says why not elsewhere)
            torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs: the last call's outputs are consumed
        return self._call(x, t, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        while True:
            chunk = min(self.chunk or n, n)
            try:
                return torch.cat([self._run(x[i:i + chunk], t[i:i + chunk], y[i:i + chunk])
                                  for i in range(0, n, chunk)])
            except torch.cuda.OutOfMemoryError:
                if not self.adaptive or chunk == 1:
                    raise
                torch.cuda.empty_cache()
                self.chunk = chunk // 2


def inference_forward(model: torch.nn.Module, cfg: DictConfig, device: torch.device) -> InferenceForward:
    """The sampling forward of `model` for a full config: the trainer's fast paths, `eval.precision` and
    `eval.max_forward_batch`."""
    fast = fast_path_settings(cfg.trainer, device, sampling=True)
    if cfg.eval.precision != "auto":
        fast["precision"] = str(cfg.eval.precision)
    return InferenceForward(model, fast, device, cfg.eval.max_forward_batch)


# ----------------------------------------------------------------------------- throughput


# Dense datasheet peaks in TFLOP/s (multiply-add = 2 flops) by device name fragment and precision.
DATASHEET_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp32"): 494.5,
    ("H100", "bf16"): 989.0, ("H100", "fp32"): 494.5,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 156.0,
}


def device_name(device: torch.device) -> str:
    """The GPU's name; for a CPU its model and the vector ISA torch's kernels use on it, because float results (and so
    a demo's FIDs, to the last digit) differ between CPUs: "cpu (AMD EPYC, family 26 model 2; AVX512; 1 threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}; {torch.backends.cpu.get_cpu_capability()}; {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    # Read by hand: three fields of /proc/cpuinfo do not justify a dependency (py-cpuinfo); elsewhere, platform's word.
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name}, family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else name


def datasheet_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense peak of a known GPU at the training precision (fp32 means TF32 tensor cores)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (fragment, prec), peak in DATASHEET_PEAK_TFLOPS.items():
        if fragment in name and prec == precision:
            return peak
    return None


def achieved_tflops(gflops_per_image: float, images_per_s: float, passes: float = 3.0) -> float:
    """Model TFLOP/s: fvcore counts one MAC as one flop, so real flops are 2x; a training step is ~3 forwards."""
    return 2.0 * gflops_per_image * 1e9 * passes * images_per_s / 1e12


def mfu(tflops: float, peak: float | None) -> float | None:
    """Model flops utilisation: achieved model TFLOP/s over a peak (None without a known peak)."""
    return tflops / peak if peak else None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GiB (2^30 bytes): CUDA memory allocated on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
