"""Training one DiT config: data -> checkpoints, metrics and FID rows.

The loop is meant to be read in one sitting (nanoGPT-style). Sections: distributed setup,
checkpoints, run state, per-step randomness, throughput, model/optimizer/fast paths, the training step,
the loop, the entry point (the Hydra app), and the dry run.

Exactness. Every random draw of a training step (timesteps, noise, label dropout) comes from a
generator seeded by (seed, step) over the GLOBAL batch, of which each rank takes its slice, and the
data stream is a resumable, seeded permutation. So a run killed at any moment and resumed from its
last checkpoint ends bitwise equal to an uninterrupted run (on CPU), and W ranks with batch B/W
train the same samples as one process with batch B.
"""

from __future__ import annotations

import copy
import math
import os
import random
import resource
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import (compose, latent_geometry, resolve_device, to_yaml, validate, with_keys_added_later,
                            with_paper_setting)
from harness.errors import HarnessError, first_line, require
from harness.io import atomic_torch_save, atomic_write_json, atomic_write_text, check_output_path, read_json, read_yaml

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
        import submitit

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


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (`step_<digits>.pt`; files named otherwise are not the harness's)."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*.pt") if p.stem[len("step_"):].isdigit())


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint file (`step_0001000.pt` -> 1000)."""
    return int(Path(path).stem[len("step_"):])


def load_latest_checkpoint(run_dir: Path, say=print) -> dict | None:
    """The newest readable checkpoint; an unreadable newer one is reported and skipped, never deleted."""
    paths = list_checkpoints(run_dir)
    for path in reversed(paths):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state or "model" not in state:
                raise ValueError("not a harness training checkpoint")
            return state
        except Exception as err:  # a truncated or corrupt file: fall back to the previous one
            say(f"checkpoint {path} is unreadable ({type(err).__name__}: {first_line(err)})")
    if paths:
        say(f"no readable checkpoint in {Path(run_dir) / 'checkpoints'}: starting from step 0")
    return None


def set_aside_unreadable(run_dir: Path, resumed_step: int) -> None:
    """Checkpoints newer than the one a run resumed from could not be read. Each is renamed
    `<name>.unreadable-<time>`: kept for inspection, but no longer counted by keep-last pruning (which
    would otherwise delete the readable one) or overwritten by the next save of its step."""
    for path in list_checkpoints(run_dir):
        if checkpoint_step(path) > resumed_step:
            path.rename(path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"))


def prune_checkpoints(run_dir: Path, keep_last: int, milestones: set[int]) -> None:
    """Keep the newest `keep_last` checkpoints and every milestone; remove the temp files of saves a kill cut short
    (only the main rank saves, one checkpoint at a time, so none is being written now)."""
    paths = list_checkpoints(run_dir)
    for path in paths[:-keep_last]:
        if checkpoint_step(path) not in milestones:
            path.unlink(missing_ok=True)
    for partial in (Path(run_dir) / "checkpoints").glob(".step_*.pt.*.tmp"):
        partial.unlink(missing_ok=True)


def resume_from_checkpoint(run_dir: Path, model, ema, opt, stream, tc: DictConfig, say=print) -> int:
    """Load the newest readable checkpoint of `run_dir` into the model, EMA, optimizer, data stream and RNGs;
    the step to go on from (0 without one). The optimizer's settings come from the config, not the file."""
    state = load_latest_checkpoint(run_dir, say=say)
    if state is None:
        return 0
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise HarnessError(f"{checkpoint_path(run_dir, int(state['step']))} does not fit this run's model "
                           f"({first_line(err)[:200]}); use another run dir or on_config_change=overwrite") from None
    for group in opt.param_groups:
        group.update(lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    stream.load_state_dict(state["data_state"])
    set_rng_state(state["rng"])
    say(f"resumed {run_dir} from step {state['step']}")
    return int(state["step"])


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


OVERWRITTEN_PREFIX = "overwritten-"  # on_config_change=overwrite moves the old run to <run dir>/overwritten-<time>/

# Keys that may change between restarts of one run without making it a different run.
RUN_CONTROL_KEYS = ("trainer.max_steps", "trainer.ckpt_every", "trainer.ckpt_milestones", "trainer.keep_last",
                    "trainer.log_every", "trainer.device", "trainer.gpus", "trainer.compile_tuning", "eval", "logger",
                    "on_config_change", "sweep_name")


def run_identity(cfg: DictConfig) -> dict:
    """The part of a config that defines what a run trains (see RUN_CONTROL_KEYS for what it leaves out)."""
    # Without the hydra node: outside a running Hydra app it holds values that only exist at run time.
    identity = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)
    for dotted in RUN_CONTROL_KEYS:
        *parents, leaf = dotted.split(".")
        node = identity
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return identity


def first_difference(old, new, prefix="") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def stored_identity(run_dir: Path) -> dict | None:
    """What the run in `run_dir` trains: its config.yaml, else the config its newest checkpoint carries."""
    saved = run_dir / "config.yaml"
    if saved.exists():
        return run_identity(with_keys_added_later(read_yaml(saved)))
    found = list_checkpoints(run_dir)
    try:  # mmap: the config of a multi-GB checkpoint without its tensors
        blob = torch.load(found[-1], map_location="cpu", weights_only=False, mmap=True) if found else None
    except Exception:  # noqa: BLE001 - an unreadable newest checkpoint is reported (and skipped) when resuming
        return None
    if isinstance(blob, dict) and isinstance(blob.get("config"), str):
        return run_identity(with_keys_added_later(OmegaConf.create(blob["config"])))
    return None


def run_dir_difference(cfg: DictConfig, run_dir: Path) -> str:
    """The first difference between what `cfg` trains and what the run in `run_dir` trains ("" if none or no run)."""
    stored = stored_identity(Path(run_dir))
    return first_difference(stored, run_identity(cfg)) if stored is not None else ""


def check_run_dir(cfg: DictConfig, run_dir: Path) -> str:
    """The first difference between `cfg` and the run `run_dir` holds ("" if none); one error line if that is a
    different run and on_config_change=refuse. Writes nothing: `harness train` asks before Hydra starts the run."""
    difference = run_dir_difference(cfg, run_dir)
    if difference and cfg.on_config_change == "refuse":
        raise HarnessError(f"{run_dir} holds a run with a different config ({difference}); "
                           "set on_config_change=resume to continue it or on_config_change=overwrite to start over")
    return difference


@contextmanager
def hold_run_dir(run_dir: Path):
    """This process trains `run_dir` alone: a second trainer of it (a duplicate launch, a second terminal) stops
    with one line before writing anything. The lock is the kernel's (flock on the directory itself), so it leaves
    no file and a killed run holds nothing; on a file system without flock (Lustre mounted without it, say) the
    run goes on unlocked."""
    import fcntl

    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            state = read_json(run_dir / "run_state.json", {}) or {}
            holder = (f"pid {state['pid']} on {state.get('host')}" if state.get("state") == "running" and state.get("pid")
                      else "another process")
            raise HarnessError(f"{run_dir} is being trained by {holder}: wait for it to end or stop it, "
                               "then launch again") from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def claim_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a run dir that holds a different run, unless told to resume it or start over."""
    saved = run_dir / "config.yaml"
    if check_run_dir(cfg, run_dir):
        if cfg.on_config_change == "overwrite":
            # Starting over never deletes: the old run moves aside.
            aside = run_dir / f"{OVERWRITTEN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for item in run_dir.iterdir():
                if item != aside and not item.name.startswith((OVERWRITTEN_PREFIX, ".hydra")) and not item.name.endswith(".log"):
                    item.rename(aside / item.name)
    atomic_write_text(saved, to_yaml(cfg))


# ----------------------------------------------------------------------------- run state


def write_run_state(run_dir: Path, state: str, step: int, max_steps: int, error: str | None = None) -> None:
    """`run_state.json`: what `harness status` and sweep relaunches read."""
    previous = read_json(run_dir / "run_state.json", {}) or {}
    requeues = int(os.environ.get("SLURM_RESTART_COUNT", previous.get("requeues", 0) or 0))
    atomic_write_json(run_dir / "run_state.json", {
        "state": state, "step": step, "max_steps": max_steps,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", previous.get("slurm_job_id")),
        "requeues": requeues, "error": error, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": os.uname().nodename, "pid": os.getpid(),
    })


class PreemptionFlag:
    """Turns SIGUSR2 and SIGTERM into a flag read at step boundaries, where the loop saves a checkpoint and leaves.

    SIGUSR2 is SLURM's warning before preemption or timeout: once the checkpoint is on disk the previous
    handler (submitit's, which requeues the job) is called. SIGTERM (`kill`, `scancel`, torchrun stopping
    its workers) exits with status 143 after the checkpoint. A second SIGTERM stops at once, as it would
    have without this handler, for a run that is busy in a long evaluation.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR2", "SIGTERM") if hasattr(signal, name))

    def __init__(self):
        self.received: list[int] = []
        self.previous: dict[int, object] = {}
        if _in_main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    @property
    def raised(self) -> bool:
        return bool(self.received)

    @property
    def requeues(self) -> bool:
        """Whether this stop is a preemption to requeue (SIGUSR2) rather than a stop (SIGTERM, or a peer's)."""
        return getattr(signal, "SIGUSR2", None) in self.received

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and signum in self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received.append(signum)
        if signum == signal.SIGTERM:  # os.write: print() may be mid-write on the same stream
            os.write(2, b"SIGTERM: stopping at the end of this step with a checkpoint (again to stop now)\n")

    def requeue_or_exit(self) -> None:
        previous = self.previous.get(getattr(signal, "SIGUSR2", None))
        if self.requeues and callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
            previous(signal.SIGUSR2, None)  # submitit: checkpoint() -> requeue -> exit
        sys.exit(0 if self.requeues else 128 + signal.SIGTERM)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- per-step randomness


def step_generator(seed: int, step: int, device: torch.device, *stream: int) -> torch.Generator:
    """The generator of one training step, the same on every rank and after any resume (`stream` splits it)."""
    mixed = int(np.random.SeedSequence([seed, step, *stream]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)


def step_draws(gen, global_batch, rank_slice, sample_shape, num_timesteps, drop_prob, device):
    """Timesteps, noise and label-dropout mask for this rank's slice of the global batch."""
    t = torch.randint(0, num_timesteps, (global_batch,), generator=gen, device=device)
    noise = torch.randn((global_batch, *sample_shape), generator=gen, device=device)
    drop = torch.rand(global_batch, generator=gen, device=device) < drop_prob
    return t[rank_slice], noise[rank_slice], drop[rank_slice]


# ----------------------------------------------------------------------------- throughput


# Dense datasheet peaks in TFLOP/s (multiply-add = 2 flops) by device name fragment and precision.
DATASHEET_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp32"): 494.5,
    ("H100", "bf16"): 989.0, ("H100", "fp32"): 494.5,
    ("A100", "bf16"): 312.0, ("A100", "fp32"): 156.0,
}


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


# ----------------------------------------------------------------------------- model, optimizer and fast paths


def build_training(cfg: DictConfig, device: torch.device) -> tuple:
    """(model, fp32 EMA, optimizer, diffusion) of `cfg` on `device`. The model is initialised on the CPU from
    `cfg.seed`, so every rank and every device starts from the same weights."""
    from harness.diffusion import create_diffusion
    from harness.model import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, latent_geometry(cfg)).to(device)
    model.grad_checkpointing = bool(cfg.trainer.grad_checkpointing)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # Training only: the EMA samples FIDs as `harness eval` does, with the residual stream in fp32.
    model.low_precision_residual = cfg.trainer.residual_precision == "bf16"
    return model, ema, build_optimizer(model, cfg.trainer, device), create_diffusion(cfg.diffusion)


def build_optimizer(model: torch.nn.Module, tc: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as configured; the fused kernel on CUDA unless told otherwise."""
    fused = tc.fused_adamw is True or (tc.fused_adamw == "auto" and device.type == "cuda")
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas),
                             fused=fused or None)


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
    from torch.nn.attention import SDPBackend, sdpa_kernel

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
    one process, called under autocast."""
    fast = fast_path_settings(tc, dist.device, dist.world_size)
    train_model = compiled(model, fast)
    if dist.world_size > 1:
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


# ----------------------------------------------------------------------------- the training step


def train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, tc: DictConfig) -> dict:
    """One optimizer step: loss (labels where `drop` is set replaced by the null label), backward, clip, AdamW, EMA.

    Nothing here reads a value back to the host, so the CPU queues the next step while the GPU runs this one;
    a non-finite loss is caught by `NonFiniteWatch` before anything is written.
    """
    torch.compiler.cudagraph_mark_step_begin()  # with CUDA graphs: a new step, the last one's buffers are free
    losses = diffusion.training_losses(forward, x, t, {"y": y, "force_drop_ids": drop.long()}, noise=noise)
    losses["loss"].mean().backward()
    if tc.grad_clip and tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(ema, model, float(tc.ema_decay))
    return losses


class NonFiniteWatch:
    """The first step whose loss was not finite, noted on the device: a host check after every step would
    make the GPU idle while the CPU queues the next one (a few percent of an H100 step, more for small models).

    `check` reads it (one sync; the earliest step over all ranks, so every rank stops together) and raises.
    The train loop checks before it logs, evaluates or saves anything, so nothing a non-finite loss touched
    reaches the disk; the steps between the bad one and the check are wasted, not written."""

    NEVER = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), self.NEVER, dtype=torch.int64, device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self.first_step = torch.where(finite, self.first_step, self.first_step.clamp(max=step))

    def check(self, dist: Dist) -> None:
        first = self.first_step.clone()
        if dist.world_size > 1:
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        first = int(first)
        if first != self.NEVER:
            raise FloatingPointError(f"non-finite loss at step {first} (on at least one rank); stopping with "
                                     "the checkpoints before it untouched")


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)


# ----------------------------------------------------------------------------- the loop


def check_run_inputs(cfg: DictConfig) -> None:
    """The files a run will read, checked before it starts or is submitted (a missing FID extractor or VAE must
    not surface after hours of training): its data (the latent cache's index, the image folder's classes), the
    VAE it encodes or decodes with, and with eval.every set the FID extractor's weights and reference."""
    from harness.autoencoders import check_autoencoder_source
    from harness.data import check_data_source

    check_data_source(cfg.data, cfg.autoencoder)
    evaluates = cfg.eval.every is not None
    if evaluates or cfg.data.name != "latents":
        check_autoencoder_source(cfg.autoencoder)
    if evaluates:
        from harness.evaluate import check_eval_config

        check_eval_config(cfg.eval, cfg.data, int(cfg.diffusion.num_timesteps))


LOGGED_LOSSES = ("loss", "mse", "vb")  # each a mean over the logging window


def train(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Train `cfg` in `run_dir` (default: Hydra's output dir, else the cwd), resuming if it holds checkpoints;
    one process at a time trains a run dir (`hold_run_dir`)."""
    validate(cfg)
    check_run_inputs(cfg)
    run_dir = Path(run_dir) if run_dir is not None else _hydra_output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    dist = setup_distributed(cfg.trainer.device)
    with hold_run_dir(run_dir) if dist.is_main else nullcontext():
        return _train_held(cfg, run_dir, dist)


def _train_held(cfg: DictConfig, run_dir: Path, dist: Dist) -> dict:
    """`train` once the run dir is this process's: claim it, resume, then the loop with its saves and evaluations."""
    from harness.data import BatchStream, build_dataset
    from harness.flops import count_flops
    from harness.model import count_params
    from harness.tracking import Tracker

    tc = cfg.trainer
    require(tc.global_batch_size % dist.world_size == 0,
            f"trainer.global_batch_size={tc.global_batch_size} is not divisible by the world size {dist.world_size}")
    local_batch = tc.global_batch_size // dist.world_size
    rank_slice = slice(dist.rank * local_batch, (dist.rank + 1) * local_batch)
    device = dist.device
    if dist.is_main:
        claim_run_dir(cfg, run_dir)
    dist.barrier()
    apply_matmul_settings(tc, device)

    geometry = latent_geometry(cfg)
    model, ema, opt, diffusion = build_training(cfg, device)
    flops = count_flops(cfg.model, geometry)
    params = count_params(model)

    dataset = build_dataset(cfg.data, "train", cfg.autoencoder)
    stream = BatchStream(dataset, local_batch, dist.rank, dist.world_size, cfg.seed, bool(cfg.data.hflip),
                         num_workers=int(cfg.data.get("num_workers", 0)), pin_memory=device.type == "cuda")
    # Pixel data through a VAE is encoded on the fly; a latent cache and pixel-space models need nothing.
    encoder = None
    if cfg.data.name != "latents" and cfg.autoencoder.name != "identity":
        from harness.evaluate import run_autoencoder

        encoder = run_autoencoder(cfg, device)

    tracker = Tracker(cfg, run_dir, enabled=dist.is_main)
    if device.type == "cuda" and int(tc.gpus) > dist.world_size:
        tracker.print(f"note: trainer.gpus={tc.gpus} but this job has {dist.world_size} process(es); trainer.gpus only "
                      f"plans (sweeps, dry runs): start it with torchrun --nproc_per_node={tc.gpus} to use {tc.gpus} GPUs")
    step = resume_from_checkpoint(run_dir, model, ema, opt, stream, tc, say=tracker.print)
    dist.barrier()  # every rank has read its checkpoint
    if dist.is_main:
        set_aside_unreadable(run_dir, step)
        tracker.resumed_at(step)
    forward, fast = training_forward(model, tc, dist)

    max_steps = int(tc.max_steps)
    milestones = {int(s) for s in tc.ckpt_milestones}
    eval_every = cfg.eval.every
    peak = tc.peak_tflops or datasheet_peak_tflops(device, fast["precision"])
    sample_shape = (geometry.in_channels, geometry.input_size, geometry.input_size)
    preemption = PreemptionFlag()
    if dist.is_main:
        write_run_state(run_dir, "running", step, max_steps)
        tracker.print(f"training {cfg.model.name} ({params / 1e6:.2f}M params, {flops['gflops']:.4g} Gflops, "
                      f"{geometry.tokens(cfg.model.patch_size)} tokens) on {device} x{dist.world_size}, "
                      f"step {step}/{max_steps}")
        if step >= max_steps:
            tracker.print(f"already at step {step}, trainer.max_steps={max_steps}: nothing to train")

    nonfinite = NonFiniteWatch(device)

    def save(step: int) -> None:
        nonfinite.check(dist)
        if dist.is_main:
            atomic_torch_save({
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                "rng": rng_state(), "data_state": stream.state_dict(), "config": to_yaml(cfg),
                "meta": {"model": cfg.model.name, "params": params, "gflops": flops["gflops"],
                         "geometry": vars(geometry)},
            }, checkpoint_path(run_dir, step))
            prune_checkpoints(run_dir, int(tc.keep_last), milestones)
        dist.barrier()

    def is_save_step(step: int) -> bool:
        return step % tc.ckpt_every == 0 or step in milestones or step == max_steps

    def stop_if_preempted(step: int) -> None:
        """On SIGUSR2 or SIGTERM (on any rank): `step` saved, the run marked preempted, then requeue or exit."""
        if not dist.any_rank(preemption.raised):
            return
        if not is_save_step(step):
            save(step)
        if dist.is_main:
            write_run_state(run_dir, "preempted", step, max_steps)
            tracker.print(f"preempted at step {step}: checkpoint saved, requeueing" if preemption.requeues
                          else f"stopped at step {step} (SIGTERM): checkpoint saved, launching again resumes")
        tracker.finish()
        preemption.requeue_or_exit()

    sample_forward = inference_forward(ema, cfg, device) if eval_every is not None else None

    def evaluate(step: int) -> None:
        from harness.evaluate import SamplingStopped, evaluate_model, evaluated_before

        nonfinite.check(dist)
        if evaluated_before(run_dir, step, cfg.eval):
            tracker.print(f"step {step}: already evaluated with this eval config (results.jsonl); not sampled again")
            return
        try:
            row = evaluate_model(ema, cfg, step, run_dir, dist=dist, flops=flops, params=params,
                                 log_fn=tracker.log_result, forward=sample_forward,
                                 stop=lambda: dist.any_rank(preemption.raised))
        except SamplingStopped:  # preempted while sampling: the resumed run samples this step again
            stop_if_preempted(step)
            raise  # not reached: stop_if_preempted exits
        if row is not None:
            tracker.print(f"step {step}: {row['fid_name']} {row['fid']:.4g} ({row['num_samples']} samples, "
                          f"{row['sampler']}, cfg {row['cfg_scale']:g})")

    try:
        if eval_every and step % eval_every == 0 and 0 < step < max_steps:
            evaluate(step)  # resumed from a checkpoint whose evaluation a kill cut short (one done is skipped)
        model.train()
        window_start, window_images, window_losses = time.time(), 0, []
        while step < max_steps:
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if encoder is not None:  # the posterior sample of this rank's images, reproducible on resume
                x = encoder.encode(x, generator=step_generator(cfg.seed, step, device, 1, dist.rank))
            gen = step_generator(cfg.seed, step, device)
            t, noise, drop = step_draws(gen, tc.global_batch_size, rank_slice, sample_shape,
                                        diffusion.num_timesteps, float(cfg.model.class_dropout_prob), device)
            losses = train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, tc)
            step += 1
            nonfinite.note(losses["loss"], step)

            tracker.progress(step, max_steps)
            window_images += tc.global_batch_size
            window_losses.append(torch.stack([losses[key].detach() for key in LOGGED_LOSSES]))  # one copy, no sync
            if step % tc.log_every == 0 or step == max_steps:
                nonfinite.check(dist)
                elapsed = time.time() - window_start
                images_per_s = window_images / max(elapsed, 1e-9)
                tflops = achieved_tflops(flops["gflops"], images_per_s / dist.world_size)
                window_means = torch.stack(window_losses).mean((0, 2))
                if dist.world_size > 1:  # the global batch's means, as one process logs them (equal shares per rank)
                    torch_dist.all_reduce(window_means)
                    window_means /= dist.world_size
                row = {"step": step, **dict(zip(LOGGED_LOSSES, window_means.tolist())),
                       "lr": opt.param_groups[0]["lr"], "images_per_s": images_per_s,
                       "tflops_per_device": tflops, "mfu": mfu(tflops, peak),
                       "peak_mem_gb": peak_memory_gb(device), "time": time.time()}
                tracker.log_metrics(row)
                tracker.print(f"step {step}/{max_steps} loss {row['loss']:.4f} {images_per_s:.1f} img/s "
                              f"{tflops:.3g} TFLOP/s" + (f" MFU {row['mfu']:.1%}" if peak else ""))
                window_start, window_images, window_losses = time.time(), 0, []

            if is_save_step(step):  # before this step's evaluation: a kill during hours of FID sampling keeps it
                save(step)
            stop_if_preempted(step)
            if eval_every and step % eval_every == 0 and step < max_steps:
                evaluate(step)

        if eval_every is not None:
            evaluate(step)
        if dist.is_main:
            write_run_state(run_dir, "done", step, max_steps)
            tracker.print(f"done at step {step}: {run_dir}")
    except BaseException as err:
        if dist.is_main and not isinstance(err, SystemExit):
            error = "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]
            write_run_state(run_dir, "failed", step, max_steps, error=error)
            tracker.write_log(f"failed at step {step}: {error}")
        raise
    finally:
        preemption.restore()
        tracker.finish()
    return {"run_dir": str(run_dir), "step": step, "params": params, "gflops": flops["gflops"]}


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd()


# ----------------------------------------------------------------------------- entry points


HYDRA_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p",
               "--package", "-i", "--info", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
               "--experimental-rerun", "-sc", "--shell-completion")


def hydra_train(argv: list[str]) -> int:
    """`harness train [overrides]`: check the config and its files first (one line on bad input; with -m every
    point of the grid, as `harness sweep` does), then run the Hydra app."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    unknown = [a for a in argv if a.startswith("-") and a.split("=", 1)[0] not in HYDRA_FLAGS]
    if unknown:
        raise HarnessError(f"harness train: unknown option {unknown[0]}; Hydra's options are {', '.join(HYDRA_FLAGS)}")
    if any(a in ("-m", "--multirun") for a in argv):
        from harness.sweep import check_multirun

        check_multirun(overrides)
    elif not any(a in ("--help", "-h", "--cfg", "-c", "--info") for a in argv):
        cfg = compose(overrides, return_hydra_config=True)
        validate(cfg)
        check_run_inputs(cfg)
        try:
            run_dir = Path(cfg.hydra.run.dir)
        except OmegaConfBaseException:  # a run dir made of ${hydra:...} values: train() checks it once Hydra has them
            run_dir = None
        if run_dir is not None:  # before Hydra writes the run's .hydra/ records into it
            check_output_path(run_dir, "hydra.run.dir", kind="dir")
            check_run_dir(cfg, run_dir)
    sys.argv = ["harness train", *argv]
    _hydra_main()
    return 0


def _hydra_task(cfg: DictConfig) -> dict:
    try:
        return train(cfg)
    except HarnessError as err:  # bad input found once the job runs (data, world size): one line, exit 2
        print(f"harness: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _hydra_main():
    import hydra

    from harness.config import CONF_DIR

    return hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(_hydra_task)()


# ----------------------------------------------------------------------------- dry run


ACTIVATION_WORDS_PER_BLOCK = 20  # fitted to H100 measurements (README, performance); the textbook count is 16


def estimate_training_memory(params: int, depth: int, tokens: int, hidden: int, batch_per_gpu: int,
                             precision: str, grad_checkpointing: bool, residual_precision: str = "fp32") -> dict:
    """Training memory per GPU, in GiB.

    State: 20 bytes/param (fp32 weights, grads, two Adam moments, EMA). Activations: per block
    20 16-bit words per token and channel per sample, doubled in fp32. Korthikanti et al. (2022) give 16
    (sbh*34 bytes less the two dropout masks DiT lacks; fused SDPA stores no T^2 attention matrix); the
    H100 peaks of compiled bf16 DiT-XL/2 training at batch 32-128 fit 20 within 5% (eager at batch 32
    measured ~22). With gradient checkpointing only each block's input is kept, plus one block's
    activations for the recomputation (measured within 2%). Under bf16 with a bf16 residual stream, the two
    LayerNorm inputs a block keeps take one word each instead of two: 18 words (XL/2 at batch 256 on an
    H200: 83.4 GiB estimated, 83.0 measured). The CUDA context (~0.5-1 GiB) is not included.
    """
    bytes_per_act = 2 if precision == "bf16" else 4
    words = ACTIVATION_WORDS_PER_BLOCK - (2 if precision == "bf16" and residual_precision == "bf16" else 0)
    per_block = words * tokens * hidden * bytes_per_act * batch_per_gpu
    if grad_checkpointing:
        activations = depth * tokens * hidden * bytes_per_act * batch_per_gpu + per_block
    else:
        activations = depth * per_block
    state = 20 * params
    return {"state_gb": state / 2**30, "activations_gb": activations / 2**30,
            "total_gb": (state + activations) / 2**30}


def dry_run(overrides: list[str], take_step: bool = True) -> dict:
    """Resolve a config, count what it costs, and prove it builds and trains with one real CPU step (the train
    app's `train_step`, EMA included, at batch 2)."""
    from harness.flops import count_flops, training_compute_flops
    from harness.model import count_params

    cfg = compose(with_paper_setting(overrides))
    validate(cfg)
    geometry = latent_geometry(cfg)
    tc, mc = cfg.trainer, cfg.model
    flops = count_flops(mc, geometry)
    tokens = geometry.tokens(mc.patch_size)
    require(tc.global_batch_size % tc.gpus == 0,
            f"trainer.global_batch_size={tc.global_batch_size} is not divisible by trainer.gpus={tc.gpus}")
    batch_per_gpu = tc.global_batch_size // tc.gpus
    gpu_precision = fast_path_settings(tc, torch.device("cuda"))["precision"]  # the estimate is per GPU
    report = {
        "config": to_yaml(cfg), "model": mc.name, "conditioning": mc.conditioning, "geometry": vars(geometry),
        "tokens": tokens, "params": flops["params"], "gflops": flops["gflops"],
        "unsupported_ops": flops.get("unsupported_ops", {}),
        "global_batch_size": tc.global_batch_size, "max_steps": tc.max_steps, "gpus": int(tc.gpus),
        "train_compute_flops": training_compute_flops(flops["gflops"], tc.global_batch_size, tc.max_steps),
        "memory": estimate_training_memory(flops["params"], mc.depth, tokens, mc.hidden_size,
                                           batch_per_gpu, gpu_precision, bool(tc.grad_checkpointing),
                                           str(tc.residual_precision)),
        "batch_per_gpu": batch_per_gpu, "precision": gpu_precision,
    }
    if take_step:
        start, cpu = time.time(), torch.device("cpu")
        model, ema, opt, diffusion = build_training(cfg, cpu)
        require(count_params(model) == flops["params"], "parameter count of the built model disagrees with the Gflops cache")
        forward = autocast_forward(model, model, fast_path_settings(tc, cpu), cpu)  # eager: a check, not a benchmark
        gen = step_generator(cfg.seed, 0, cpu)
        t, noise, drop = step_draws(gen, 2, slice(None), (geometry.in_channels, geometry.input_size, geometry.input_size),
                                    diffusion.num_timesteps, float(mc.class_dropout_prob), cpu)
        x = torch.randn(noise.shape, generator=gen)
        y = torch.randint(0, geometry.num_classes, (2,), generator=gen)
        loss = train_step(forward, diffusion, model, ema, opt, x, y, t, noise, drop, tc)["loss"].mean().item()
        require(math.isfinite(loss), f"the dry-run step of {mc.name} gave a non-finite loss")
        report["step"] = {"loss": loss, "seconds": time.time() - start, "batch": 2, "device": "cpu"}
    return report


def format_dry_run(report: dict) -> str:
    m = report["memory"]
    g = report["geometry"]
    lines = [
        report["config"].rstrip(),
        "---",
        f"model            {report['model']} ({report['conditioning']})",
        f"input            {g['in_channels']}x{g['input_size']}x{g['input_size']}, {g['num_classes']} classes",
        f"tokens           {report['tokens']}",
        f"params           {report['params']:,} ({report['params'] / 1e6:.1f}M)",
        f"forward Gflops   {report['gflops']:.3f} per image (fvcore: 1 multiply-add = 1 flop)",
        f"training compute {report['train_compute_flops']:.3e} flops "
        f"(Gflops x batch {report['global_batch_size']} x steps {report['max_steps']} x 3)",
        f"memory per GPU   ~{m['total_gb']:.3g} GiB at {report['precision']}, batch {report['batch_per_gpu']}/GPU "
        f"on {report['gpus']} GPU(s): state {m['state_gb']:.3g} GiB (20 B/param: fp32 weights, grads, Adam, EMA) "
        f"+ activations {m['activations_gb']:.3g} GiB (fitted to compiled bf16 on an H100)",
    ]
    if report.get("unsupported_ops"):
        lines.append(f"fvcore skipped   {report['unsupported_ops']}")
    if "step" in report:
        s = report["step"]
        lines.append(f"one real step    loss {s['loss']:.4f}, the train step (forward, backward, AdamW, EMA) on batch "
                     f"{s['batch']} on the {s['device']} in {s['seconds']:.1f} s")
    return "\n".join(lines)
