"""Bad input, command by command: exit status 2, one line `harness: error: ...` naming the key or path, no
traceback, and nothing written or changed (checked before any sampling, training or benchmarking starts).

Each case runs in a fresh workspace (the test's tmp dir, also the cwd) holding:
  run/     a finished 2-step tiny training run (checkpoint, config.yaml)
  images/  a tiny image folder (2 classes)
  ro/      a directory made immutable with `chattr +i` (even root cannot write there)
  file     a plain file (a path under it cannot be made)
The workspace, the repo's harness/assets/ and runs/ and the session's cache dir are snapshotted before and compared
after (path -> size, mtime_ns and sha256 of files; mtime_ns of directories).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, harness_env, run_harness
from helpers import make_image_folder
from harness.cli import main
from harness.io import sha256_file

IMAGES = ["data=imagefolder", "data.root={tmp}/images", "data.image_size=16", "data.num_classes=2"]  # the workspace's
# The demo sweep cut to one tiny point of 2 steps, should a check be missing and the launch go ahead.
SWEEP = ["demo", "model=custom", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=8",
         "trainer.global_batch_size=16", "trainer.max_steps=2", "eval.every=0"]

# (id, argv with {tmp} for the workspace, a fragment the error line must contain)
CASES = [
    # train
    ("train-unknown-model", ["train", "model=no-such-model"], "no-such-model"),
    ("train-unknown-key", ["train", *TINY, "trainer.no_such_key=1"], "trainer.no_such_key"),
    ("train-wrong-type", ["train", *TINY, "trainer.max_steps=many"], "trainer.max_steps"),
    ("train-out-of-range", ["train", *TINY, "trainer.global_batch_size=0"], "trainer.global_batch_size"),
    ("train-missing-data-dir", ["train", *TINY, "data=imagefolder", "data.root={tmp}/no-such-dir"], "{tmp}/no-such-dir"),
    ("train-missing-vae", ["train", *TINY, *IMAGES, "data.image_size=32", "autoencoder=sd-vae-ft-ema",
                           "autoencoder.path={tmp}/no-such-vae"], "{tmp}/no-such-vae"),
    ("train-argument-without-equals", ["train", "foo"], "foo"),
    ("train-no-gpu", ["train", *TINY, "trainer.device=cuda"], "trainer.device"),
    ("train-resume-other-model", ["train", *TINY, "model.hidden_size=64", "trainer.max_steps=4",
                                  "trainer.ckpt_every=2", "on_config_change=resume", "hydra.run.dir={tmp}/run"],
     "{tmp}/run"),
    ("train-run-dir-under-a-file", ["train", *TINY, "hydra.run.dir={tmp}/file/run"], "hydra.run.dir={tmp}/file/run"),
    ("train-run-dir-immutable", ["train", *TINY, "hydra.run.dir={tmp}/ro"], "hydra.run.dir={tmp}/ro"),
    ("train-run-dir-proc", ["train", *TINY, "hydra.run.dir=/proc/harness-run"], "hydra.run.dir=/proc/harness-run"),
    ("train-fsdp-one-process", ["train", *TINY, "trainer.parallel=fsdp", "hydra.run.dir={tmp}/run"],
     "trainer.parallel=fsdp needs more than one process"),
    ("train-multirun-dir-proc", ["train", "-m", *TINY, "trainer.max_steps=2", "hydra.sweep.dir=/proc/harness-sweep"],
     "/proc/harness-sweep"),
    # eval
    ("eval-missing-ckpt", ["eval", "ckpt={tmp}/no-such.pt"], "{tmp}/no-such.pt"),
    ("eval-no-ckpt", ["eval", "eval.num_samples=8"], "ckpt"),
    ("eval-bad-step", ["eval", "ckpt={tmp}/run", "step=last"], "step"),
    ("eval-unknown-key", ["eval", "ckpt={tmp}/run", "eval.no_such_key=1"], "eval.no_such_key"),
    ("eval-out-of-range", ["eval", "ckpt={tmp}/run", "eval.num_samples=-5"], "eval.num_samples"),
    ("eval-missing-weights", ["eval", "ckpt={tmp}/run", "eval.digits_weights={tmp}/no-such-cnn.pt"],
     "{tmp}/no-such-cnn.pt"),
    ("eval-out-immutable", ["eval", "ckpt={tmp}/run", "out={tmp}/ro"], "out={tmp}/ro"),
    ("eval-out-proc", ["eval", "ckpt={tmp}/run", "out=/proc/harness-eval"], "out=/proc/harness-eval"),
    ("eval-no-gpu", ["eval", "ckpt={tmp}/run", "trainer.device=cuda"], "device"),
    # sweep
    ("sweep-unknown-sweep", ["sweep", "no-such-sweep", "--dry-run"], "no-such-sweep"),
    ("sweep-dry-run-unknown-model", ["sweep", "demo", "--dry-run", "model=mini-S/2,no-such-model",
                                     "hydra.sweep.dir={tmp}/sweep"], "no-such-model"),
    ("sweep-dry-run-two-problems", ["sweep", "demo", "--dry-run", "trainer.lr=-1,-2", "hydra.sweep.dir={tmp}/sweep"],
     "trainer.lr"),
    ("sweep-dry-run-wrong-type", ["sweep", "demo", "--dry-run", "trainer.max_steps=many",
                                  "hydra.sweep.dir={tmp}/sweep"], "trainer.max_steps"),
    ("sweep-local-out-of-range", ["sweep", *SWEEP, "launcher=local", "trainer.lr=-1", "hydra.sweep.dir={tmp}/sweep"],
     "trainer.lr"),
    ("sweep-local-unknown-key", ["sweep", *SWEEP, "launcher=local", "model.no_such_key=1",
                                 "hydra.sweep.dir={tmp}/sweep"], "model.no_such_key"),
    ("sweep-local-missing-data-dir", ["sweep", *SWEEP, "launcher=local", "data=imagefolder",
                                      "data.root={tmp}/no-such-dir", "hydra.sweep.dir={tmp}/sweep"], "{tmp}/no-such-dir"),
    ("sweep-local-dir-immutable", ["sweep", *SWEEP, "launcher=local", "hydra.sweep.dir={tmp}/ro/sweep"], "{tmp}/ro"),
    ("sweep-local-dir-proc", ["sweep", *SWEEP, "launcher=local", "hydra.sweep.dir=/proc/harness-sweep"],
     "/proc/harness-sweep"),
    ("sweep-local-changed-run", ["sweep", *SWEEP, "launcher=local", "run_name=run", "hydra.sweep.dir={tmp}"],
     "on_config_change"),
    ("sweep-local-no-gpu", ["sweep", *SWEEP, "launcher=local", "trainer.device=cuda", "hydra.sweep.dir={tmp}/sweep"],
     "trainer.device"),
    ("sweep-local-launcher-wrong-type", ["sweep", *SWEEP, "launcher=local", "hydra.launcher.cpus_per_task=abc",
                                        "hydra.sweep.dir={tmp}/sweep"], "hydra.launcher.cpus_per_task"),
    ("sweep-local-launcher-out-of-range", ["sweep", *SWEEP, "launcher=local", "hydra.launcher.max_parallel=0",
                                           "hydra.sweep.dir={tmp}/sweep"], "hydra.launcher.max_parallel"),
    ("sweep-local-launcher-wait", ["sweep", *SWEEP, "launcher=local", "hydra.launcher.wait_s=soon",
                                   "hydra.sweep.dir={tmp}/sweep"], "hydra.launcher.wait_s"),
    ("sweep-dry-run-slurm-memory", ["sweep", "paper_grid", "--dry-run", "hydra.launcher.mem_gb=-2"],
     "hydra.launcher.mem_gb"),
    # status
    ("status-missing-dir", ["status", "{tmp}/no-such-sweep"], "{tmp}/no-such-sweep"),
    ("status-of-a-run-dir", ["status", "{tmp}/run"], "{tmp}/run"),
    ("status-no-dir", ["status"], "sweep_dir"),
    # report
    ("report-missing-sweep-dir", ["report", "{tmp}/no-such-sweep", "-o", "{tmp}/report"], "{tmp}/no-such-sweep"),
    ("report-no-out", ["report", "{tmp}/run"], "-o"),
    ("report-bad-step", ["report", "{tmp}/run", "-o", "{tmp}/report", "--step", "last"], "--step"),
    ("report-out-immutable", ["report", "{tmp}/run", "-o", "{tmp}/ro"], "{tmp}/ro"),
    ("report-out-proc", ["report", "{tmp}/run", "-o", "/proc/harness-report"], "/proc/harness-report"),
    # flops
    ("flops-unknown-model", ["flops", "--models", "no-such-model"], "no-such-model"),
    ("flops-wrong-type", ["flops", "--models", "mini-S/2", "model.hidden_size=wide"], "model.hidden_size"),
    ("flops-bad-format", ["flops", "--format", "xml"], "--format"),
    # dry-run
    ("dry-run-unknown-model", ["dry-run", "model=no-such-model"], "no-such-model"),
    ("dry-run-unknown-key", ["dry-run", "no_such_key=1"], "no_such_key"),
    ("dry-run-out-of-range", ["dry-run", *TINY, "model.num_heads=3"], "model.num_heads"),
    ("dry-run-wrong-type", ["dry-run", *TINY, "trainer.lr=fast"], "trainer.lr"),
    ("dry-run-batch-not-divisible", ["dry-run", *TINY, "trainer.gpus=3"], "trainer.gpus=3"),
    # bench
    ("bench-unknown-what", ["bench", *TINY, "--what", "everything", "--log", "{tmp}/bench.jsonl"], "everything"),
    ("bench-no-gpu", ["bench", *TINY, "trainer.device=cuda", "--log", "{tmp}/bench.jsonl"], "trainer.device"),
    ("bench-wrong-type", ["bench", *TINY, "trainer.global_batch_size=big", "--log", "{tmp}/bench.jsonl"],
     "trainer.global_batch_size"),
    ("bench-log-immutable", ["bench", *TINY, "trainer.device=cpu", "--log", "{tmp}/ro/bench.jsonl"], "--log={tmp}/ro/bench.jsonl"),
    ("bench-log-proc", ["bench", *TINY, "trainer.device=cpu", "--log", "/proc/bench.jsonl"], "--log=/proc/bench.jsonl"),
    ("bench-log-is-a-dir", ["bench", *TINY, "trainer.device=cpu", "--log", "{tmp}/run"], "--log={tmp}/run"),
    # extract-latents
    ("extract-no-out", ["extract-latents", *IMAGES], "out"),
    ("extract-missing-data-dir", ["extract-latents", "out={tmp}/latents", "data.root={tmp}/no-such-dir"],
     "{tmp}/no-such-dir"),
    ("extract-missing-vae", ["extract-latents", "out={tmp}/latents", *IMAGES, "autoencoder.path={tmp}/no-such-vae"],
     "{tmp}/no-such-vae"),
    ("extract-out-of-range", ["extract-latents", "out={tmp}/latents", *IMAGES, "extract.dtype=fp8"], "extract.dtype"),
    ("extract-unknown-key", ["extract-latents", "out={tmp}/latents", *IMAGES, "extract.no_such_key=1"],
     "extract.no_such_key"),
    ("extract-no-gpu", ["extract-latents", "out={tmp}/latents", *IMAGES, "extract.device=cuda"], "extract.device"),
    ("extract-out-immutable", ["extract-latents", "out={tmp}/ro", *IMAGES], "out={tmp}/ro"),
    ("extract-out-proc", ["extract-latents", "out=/proc/harness-latents", *IMAGES], "out=/proc/harness-latents"),
    # train-digits-cnn
    ("digits-cnn-no-out", ["train-digits-cnn"], "--out"),
    ("digits-cnn-out-immutable", ["train-digits-cnn", "--out", "{tmp}/ro/cnn.pt"], "--out={tmp}/ro/cnn.pt"),
    ("digits-cnn-out-proc", ["train-digits-cnn", "--out", "/proc/cnn.pt"], "--out=/proc/cnn.pt"),
    ("digits-cnn-out-is-a-dir", ["train-digits-cnn", "--out", "{tmp}/run"], "--out={tmp}/run"),
    ("digits-cnn-out-of-range", ["train-digits-cnn", "--out", "{tmp}/cnn.pt", "data.image_size=7"], "data.image_size"),
    ("digits-cnn-other-data", ["train-digits-cnn", "--out", "{tmp}/cnn.pt", "data=imagefolder",
                               "data.root={tmp}/images"], "data=digits"),
    ("digits-cnn-bad-seed", ["train-digits-cnn", "--out", "{tmp}/cnn.pt", "--seed", "one"], "--seed"),
]

# Cases run as a real `harness` process: the CLI's own path from argv to exit status, stderr and no traceback.
IN_A_PROCESS = {"train-argument-without-equals"}

# A grid with several problems names each on a line of its own under one error line (README: "one line per
# problem"), so a user fixes them all at once.
LISTS_PROBLEMS = {"sweep-dry-run-two-problems"}


def snapshot(*roots: Path) -> dict:
    """path -> what could show a change: (size, mtime_ns, sha256) of a file, mtime_ns of a directory."""
    state = {}
    for root in roots:
        if not root.exists():
            state[root] = None
            continue
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            state[path] = ((st.st_size, st.st_mtime_ns, sha256_file(path)) if path.is_file() and not path.is_symlink()
                           else st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step tiny training run with its checkpoint, trained once for the module."""
    from harness.config import compose
    from harness.train.loop import train

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    train(compose([*TINY, "trainer.max_steps=2", "trainer.ckpt_every=2", "trainer.device=cpu"]), run_dir)
    return run_dir


@pytest.fixture
def workspace(tmp_path, tiny_run, monkeypatch):
    shutil.copytree(tiny_run, tmp_path / "run")
    make_image_folder(tmp_path / "images", classes=2, per_class=2, size=16)
    (tmp_path / "file").write_text("a plain file\n")
    (tmp_path / "ro").mkdir()
    subprocess.run(["chattr", "+i", str(tmp_path / "ro")], check=True)
    monkeypatch.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "ro")], check=True)


def watched(workspace: Path) -> list[Path]:
    return [workspace, REPO / "harness" / "assets", REPO / "runs", Path(os.environ["HARNESS_CACHE_DIR"])]


def run_in_process(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`harness ARGV` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["harness", *argv])
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def _param(case_id, argv, fragment):
    return pytest.param(argv, fragment, case_id in IN_A_PROCESS, case_id in LISTS_PROBLEMS, id=case_id)


@pytest.mark.parametrize("argv, fragment, real_process, lists_problems", [_param(*case) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, fragment, real_process, lists_problems, workspace,
                                                          capsys, monkeypatch):
    argv = [a.format(tmp=workspace) for a in argv]
    fragment = fragment.format(tmp=workspace)
    before = snapshot(*watched(workspace))
    if real_process:
        done = run_harness(argv, cwd=workspace, timeout=120)
        status, stderr = done.returncode, done.stderr
    else:
        status, _, stderr = run_in_process(argv, capsys, monkeypatch)
    assert "Traceback" not in stderr, stderr
    first, *problems = stderr.splitlines()
    assert status == 2 and first.startswith("harness: error: ") and fragment in stderr, stderr
    if lists_problems:
        assert len(problems) >= 2 and all(line.startswith("  - ") for line in problems), stderr
    else:
        assert not problems, stderr
    assert snapshot(*watched(workspace)) == before


def test_a_second_launch_onto_a_run_dir_being_trained_writes_nothing(workspace):
    run_dir = workspace / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from harness.run_dir import RunDir\n"
                               "with RunDir(Path(sys.argv[1])).lock():\n    print(flush=True); time.sleep(120)",
                               str(run_dir)], cwd=REPO, env=harness_env(), stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the run dir now
        before = snapshot(*watched(workspace))
        second = run_harness(["train", *TINY, "trainer.max_steps=4", "trainer.ckpt_every=2",
                              f"hydra.run.dir={run_dir}"], cwd=workspace, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"harness: error: {run_dir} is being trained by ")
        assert len(second.stderr.splitlines()) == 1 and "Traceback" not in second.stderr
        assert snapshot(*watched(workspace)) == before
    finally:
        holder.kill()
        holder.communicate()


def test_bench_prints_its_table_before_a_log_write_fails(workspace, capsys, monkeypatch):
    def full_disk(path, row):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("harness.bench.append_jsonl", full_disk)
    log = workspace / "bench.jsonl"
    status, stdout, stderr = run_in_process(["bench", "--what", "train", *TINY, "trainer.device=cpu", "--log", str(log)],
                                            capsys, monkeypatch)
    assert (status, stderr) == (1, f"harness: error: [Errno 28] No space left on device: '{log}'\n")  # the machine's
    assert "train step" in stdout and '"images_per_s"' in stdout  # the table and its JSON, printed before the log


@pytest.mark.parametrize("command, damage", [("train", "no-metadata"), ("train", "no-part"), ("eval", "no-metadata"),
                                              ("eval", "no-part"), ("train", "world-size")])
def test_a_checkpoint_that_cannot_be_resumed_is_refused_and_left_untouched(command, damage, workspace, capsys,
                                                                           monkeypatch):
    """A checkpoint directory missing its .metadata or a rank's part (something outside the run removed it: a
    save renames the directory into place only once all of it is written), or a world size the run's global
    batch, and so its checkpoint, cannot be split across: one line naming the file or key, nothing written."""
    checkpoint = workspace / "run" / "checkpoints" / "step_0000002"
    missing = {"no-metadata": checkpoint / ".metadata", "no-part": checkpoint / "__0_0.distcp"}.get(damage)
    if missing is not None:
        missing.unlink()
    else:
        monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 tells each worker
    before = snapshot(*watched(workspace))
    argv = (["train", *TINY, "trainer.max_steps=4", "trainer.ckpt_every=2", f"hydra.run.dir={workspace / 'run'}"]
            if command == "train" else ["eval", f"ckpt={workspace / 'run'}"])
    status, _, stderr = run_in_process(argv, capsys, monkeypatch)
    fragment = str(missing) if missing is not None else "trainer.global_batch_size=16 is not divisible by the world size 3"
    assert status == 2 and stderr.startswith("harness: error: ") and len(stderr.splitlines()) == 1, stderr
    assert fragment in stderr, stderr
    assert snapshot(*watched(workspace)) == before
