"""The config schema: every key of the train config, its type and, where one value serves every option of a
group, its default. Registered in Hydra's ConfigStore on import; `conf/train.yaml` starts from `schema: train`
and the data, autoencoder and logger options that add keys of their own, and the two harness launchers
(`hydra.launcher`), start from `schema/<group>/<option>`, so composition refuses a key the schema does not know
and a value of the wrong type.

OmegaConf 2.3 has no unions and no ranges: a key that takes an int or a float, or a string or a bool, is `Any`
here, and the allowed values of every key (ranges, choices) are the rules of `harness.config.values`, which
`harness.config.checks.validate` runs once per launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# An int or a float. A float node would also store the 25 a user gave as 25.0 and report -1 as -1.0.
Number = Any
# True or false, and nothing else: OmegaConf's bool reads 1 and "yes" as true, the trainer's flags refuse them.
StrictBool = Any


@dataclass
class ModelConfig:
    conditioning: str = "adaln_zero"  # adaln_zero | adaln | cross_attention | in_context
    mlp_ratio: Number = 4.0
    learn_sigma: bool = True
    class_dropout_prob: Number = 0.1
    # The model group's options (conf/model/) set the architecture.
    name: str = MISSING
    size: str = MISSING
    depth: int = MISSING
    hidden_size: int = MISSING
    num_heads: int = MISSING
    patch_size: int = MISSING


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_start: Number = 0.0001
    beta_end: Number = 0.02


@dataclass
class DataConfig:
    name: str = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    num_classes: int = MISSING
    hflip: bool = MISSING
    num_workers: int = MISSING


@dataclass
class DigitsData(DataConfig):
    held_out_fraction: Number = MISSING
    split_seed: int = MISSING


@dataclass
class ImageFolderData(DataConfig):
    root: str = MISSING
    on_bad_image: str = MISSING  # skip | fail
    held_out_root: Optional[str] = None


@dataclass
class LatentsData(DataConfig):
    root: str = MISSING
    verify_checksums: bool = MISSING


@dataclass
class AutoencoderConfig:
    name: str = MISSING
    downsample: int = MISSING
    latent_channels: Optional[int] = None  # null: the data's channels
    scale_factor: Number = MISSING


@dataclass
class VAEConfig(AutoencoderConfig):
    path: str = MISSING  # a local directory or a hub id


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    global_batch_size: int = MISSING
    lr: Number = MISSING
    warmup_steps: int = MISSING
    lr_schedule: str = MISSING  # constant | cosine
    weight_decay: Number = MISSING
    betas: List[Number] = MISSING
    ema_decay: Number = MISSING
    grad_clip: Number = MISSING
    precision: str = MISSING
    tf32: StrictBool = MISSING
    compile: Any = MISSING  # auto | true | false
    compile_mode: str = MISSING
    residual_precision: str = MISSING
    compile_tuning: StrictBool = MISSING
    attention: str = MISSING
    grad_checkpointing: StrictBool = MISSING
    fused_adamw: Any = MISSING  # auto | true | false
    ddp_bucket_mb: Number = MISSING
    parallel: str = MISSING  # ddp | fsdp
    async_checkpoint: StrictBool = MISSING
    device: str = MISSING
    gpus: int = MISSING
    ckpt_every: int = MISSING
    ckpt_milestones: List[int] = MISSING
    keep_last: int = MISSING
    log_every: int = MISSING
    peak_tflops: Optional[Number] = None
    gpu_memory_gib: Number = 80  # one GPU's memory: the dry run says whether a config fits it (H100: 80; H200: 139)


@dataclass
class EvalConfig:
    every: Optional[int] = MISSING
    fid_every: Optional[int] = None
    num_samples: int = MISSING
    sampler: str = MISSING
    ddim_eta: Number = MISSING
    cfg_scale: Number = MISSING
    cfg_channels: Optional[int] = None
    labels: str = MISSING
    batch_size: int = MISSING
    max_forward_batch: Any = MISSING  # auto | a positive integer
    precision: str = MISSING
    seed: int = MISSING
    feature_extractor: str = MISSING
    inception_weights: Optional[str] = None
    digits_weights: Optional[str] = None
    reference: Optional[str] = None
    reference_limit: Optional[int] = None
    isc: bool = MISSING
    prc: bool = MISSING
    save_npz: bool = MISSING
    save_grid: bool = MISSING
    cache_dir: Optional[str] = None
    val_timesteps: int = MISSING
    val_limit: Optional[int] = None
    fid_resamples: Any = MISSING  # auto | an integer >= 0


@dataclass
class LoggerConfig:
    name: str = MISSING


@dataclass
class WandbLogger(LoggerConfig):
    project: str = MISSING
    entity: Optional[str] = None
    mode: str = MISSING
    group: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class LauncherConfig:
    """`hydra.launcher` of the harness launchers (conf/hydra/launcher/harness_{local,slurm}.yaml; what each key
    does is said there). A sweep may add `by_size`, settings per model size that its keys interpolate."""
    _target_: str = MISSING
    timeout_min: int = MISSING
    gpus_per_node: Optional[int] = None
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    setup: List[str] = field(default_factory=list)
    signal_delay_s: int = MISSING
    max_num_timeout: int = MISSING
    stderr_to_stdout: StrictBool = False
    wait_s: Number = MISSING
    poll_s: Number = MISSING
    by_size: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalLauncher(LauncherConfig):
    max_parallel: Optional[int] = None


@dataclass
class SlurmLauncher(LauncherConfig):
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    comment: Optional[str] = None
    gres: Optional[str] = None
    max_gpus_per_node: Optional[int] = None
    nodes: Optional[int] = None
    mem_gb: Optional[Number] = None
    additional_parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    run_name: str = "${slug:${data.name}-${model.name}-${model.conditioning}${seed_suffix:${seed}}}"
    sweep_name: Optional[str] = None  # set by `harness sweep`; groups wandb runs
    seed: int = 0
    on_config_change: str = "refuse"  # what to do when the run dir holds a run with a different config: refuse | resume | overwrite
    data: DataConfig = MISSING
    autoencoder: AutoencoderConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING


@dataclass
class ExtractConfig:
    shard_size: int = 1000  # images per shard (each shard holds their latents and their flips' latents)
    batch_size: int = 32  # images per encoder forward pass (the flips double it)
    dtype: str = "fp16"  # fp16 | fp32: how latents are stored
    device: str = "auto"  # auto (cuda:LOCAL_RANK when available) | cpu | cuda | cuda:N


@dataclass
class ExtractLatentsConfig(TrainConfig):
    out: Optional[str] = None  # the cache directory to write (required): out=DIR
    extract: ExtractConfig = field(default_factory=ExtractConfig)


def register() -> None:
    store = ConfigStore.instance()
    # The root schema is a group so that extract_latents.yaml can override the one train.yaml picks.
    store.store(group="schema", name="train", node=TrainConfig, package="_global_")
    store.store(group="schema", name="extract_latents", node=ExtractLatentsConfig, package="_global_")
    for group, option, node in (("data", "digits", DigitsData), ("data", "imagefolder", ImageFolderData),
                                ("data", "latents", LatentsData), ("autoencoder", "vae", VAEConfig),
                                ("logger", "wandb", WandbLogger), ("launcher", "local", LocalLauncher),
                                ("launcher", "slurm", SlurmLauncher)):
        store.store(group=f"schema/{group}", name=option, node=node)


register()
