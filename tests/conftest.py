"""Shared test helpers: tiny configs and running the real `harness` command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HARNESS = [sys.executable, "-m", "harness.cli"]

# A DiT small enough to train a few dozen steps in seconds on one core (digits at 8x8, 4 tokens).
TINY = [
    "model=custom", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
    "data.image_size=8", "trainer.global_batch_size=16", "trainer.log_every=5", "eval.every=null",
    "logger=none",
]


def harness_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"MPLBACKEND": "Agg", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_harness(args: list[str], cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `harness ARGS` for real and capture its output."""
    return subprocess.run([*HARNESS, *args], cwd=cwd or REPO, env=harness_env(**env), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """Gflops counts and FID statistics of this test session stay out of the user's cache."""
    os.environ["HARNESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("harness-cache"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: intra-op threads only contend with the subprocesses tests start."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

