"""`harness train`: the Hydra app around `harness.train.loop.train`, with every check that can run before Hydra
writes anything into the run dir."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from harness.config import CONF_DIR, compose, resolve_device
from harness.config.checks import check_run_inputs, validate
from harness.errors import HarnessError
from harness.io import check_output_path
from harness.run_dir import RunDir
from harness.sweep.launch import check_multirun
from harness.train.runtime import check_parallel

HYDRA_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p",
               "--package", "-i", "--info", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
               "--experimental-rerun", "-sc", "--shell-completion")
# Hydra options followed by a value of their own (`-cn train`); --info's value is optional and one of its topics.
HYDRA_VALUE_FLAGS = ("-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                     "--experimental-rerun", "-sc", "--shell-completion")
HYDRA_INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def stray_argument(argv: list[str]) -> str | None:
    """The first argument that is neither an override (`key=value`, `~key`) nor a Hydra option or its value."""
    previous = None
    for arg in argv:
        is_value = previous in HYDRA_VALUE_FLAGS or (previous in ("-i", "--info") and arg in HYDRA_INFO_TOPICS)
        if not (is_value or arg.startswith(("-", "~")) or "=" in arg):
            return arg
        previous = arg
    return None


def hydra_train(argv: list[str]) -> int:
    """`harness train [overrides]`: check the config and its files first (one line on bad input; with -m every
    point of the grid, as `harness sweep` does), then run the Hydra app."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    unknown = [a for a in argv if a.startswith("-") and a.split("=", 1)[0] not in HYDRA_FLAGS]
    if unknown:
        raise HarnessError(f"harness train: unknown option {unknown[0]}; Hydra's options are {', '.join(HYDRA_FLAGS)}")
    stray = stray_argument(argv)
    if stray is not None:
        raise HarnessError(f"harness train: {stray!r} is not an override; give key=value (e.g. model=mini-S/2), "
                           "+key=value to add a key or ~key to remove one")
    run_dir = None
    if any(a in ("-m", "--multirun") for a in argv):
        check_multirun(overrides)
    elif not any(a in ("--help", "-h", "--cfg", "-c", "--info") for a in argv):
        cfg = compose(overrides, return_hydra_config=True)
        validate(cfg)
        check_run_inputs(cfg)
        resolve_device(cfg.trainer.device, "trainer.device")
        check_parallel(cfg.trainer, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's workers know their world
        try:
            run_dir = RunDir(cfg.hydra.run.dir)
        except OmegaConfBaseException:  # a run dir made of ${hydra:...} values: train() checks it once Hydra has them
            pass
        if run_dir is not None:  # before Hydra writes the run's .hydra/ records into it
            check_output_path(run_dir.path, "hydra.run.dir", kind="dir")
            run_dir.check_checkpoints()  # an incomplete newest checkpoint directory: one line, nothing touched
            if run_dir.check_claim(cfg):  # resuming a changed config: its weights must still fit
                from harness.train.checkpoint import check_checkpoint_fits

                check_checkpoint_fits(cfg, run_dir)
    sys.argv = ["harness train", *argv]
    if run_dir is None or int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 trains the dir alone
        _hydra_main()
        return 0
    run_dir.path.mkdir(parents=True, exist_ok=True)
    with run_dir.lock():  # before Hydra writes into the dir: a second `harness train` of it changes nothing
        _hydra_main()
    return 0


def _hydra_task(cfg: DictConfig) -> dict:
    """The task Hydra runs for each run: every way to it (`harness train`, `-m`, `harness sweep`'s launchers)
    checked the config and its files before Hydra started."""
    # Imported here, once the checks passed: with it come torch-fidelity and the checkpointer, so a bad value is
    # reported sooner without them (about 5 s instead of 8 s on a 2-core machine).
    from harness.train.loop import train

    try:
        return train(cfg, checked=True)
    except HarnessError as err:  # bad input found once the job runs (data, world size): one line, exit 2
        print(f"harness: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _hydra_main():
    return hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(_hydra_task)()
