"""The `harness` command: a thin layer over the library functions that notebooks and tests call too.

Every subcommand takes Hydra-style overrides (`model=DiT-XL/2 trainer.global_batch_size=32`) where it
builds a config. Bad input raises `HarnessError`, printed here as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from harness.errors import HarnessError, require
from harness.io import check_output_path
from harness.progress import to_stderr

# Each subcommand imports the modules it runs when it runs: `harness status` and `harness report` then start
# without importing torch, Hydra's launchers and torch-fidelity (seconds on a busy login node).


def _names_and_overrides(names: list[str] | None, overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--option A B key=value`: argparse hands trailing overrides to the option; sort them back out."""
    items = [*(names or []), *overrides]
    return [item for item in items if "=" not in item], [item for item in items if "=" in item]


def _train(args: argparse.Namespace) -> int:
    from harness.train.app import hydra_train

    return hydra_train(args.overrides)


def _dry_run(args: argparse.Namespace) -> int:
    from harness.train.dry_run import dry_run, format_dry_run

    print(format_dry_run(dry_run(args.overrides, take_step=not args.no_step, say=to_stderr)))  # phases on stderr
    return 0


def _flops(args: argparse.Namespace) -> int:
    from harness.flops import flops_table, format_table

    models, overrides = _names_and_overrides(args.models, args.overrides)
    rows = flops_table(models or None, overrides, conditioning_ablation=args.ablation, say=to_stderr)  # per config
    print(format_table(rows, args.format))
    return 0


def _extract_latents(args: argparse.Namespace) -> int:
    from harness.config import compose
    from harness.data import extract_latents, rank_world_from_env

    cfg = compose(args.overrides, config_name="extract_latents")
    rank, world_size = rank_world_from_env()
    summary = extract_latents(cfg, cfg.out, rank, world_size)
    print(f"extract-latents rank {rank}/{world_size}: wrote {summary['written']} shard(s), reused {summary['reused']} "
          f"of {summary['num_shards']} in {summary['out']}")
    if summary["complete"]:
        print(f"latent cache complete: {summary['num_images']} images ({summary['skipped']} skipped); "
              f"train with data=latents data.root={summary['out']}")
    return 0


EVAL_ARGS = ("ckpt", "out", "step")  # `harness eval` arguments that are not config keys


def _eval(args: argparse.Namespace) -> int:
    from harness.evaluate.run import evaluate_checkpoint

    named, overrides = {}, []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if sep and key in EVAL_ARGS:
            named[key] = value
        else:
            overrides.append(item)
    require("ckpt" in named, "harness eval needs ckpt=PATH (one of our checkpoints or a released DiT .pt)")
    require(named.get("step", "0").isdigit(), f"step={named.get('step')!r} must be a non-negative integer")
    if "out" in named:
        check_output_path(named["out"], "out", kind="dir")
    row = evaluate_checkpoint(named["ckpt"], overrides, run_dir=named.get("out"),
                              step=int(named["step"]) if "step" in named else None)
    if row is not None:  # rank 0 of a distributed evaluation
        extra = "".join(f", {k} {row[k]:.4g}" for k in ("fid_floor", "isc", "precision", "recall") if k in row)
        print(f"{row['fid_name']} {row['fid']:.4f} ({row['feature_extractor']}, {row['num_samples']} samples, "
              f"{row['sampler']}, cfg {row['cfg_scale']}{extra}) at step {row['step']} -> "
              f"{row['run_dir']}/results.jsonl")
    return 0


def _train_digits_cnn(args: argparse.Namespace) -> int:
    from harness.config import compose, latent_geometry
    from harness.digits_cnn import train_digits_extractor

    out = check_output_path(args.out, "--out")
    cfg = compose(args.overrides)
    latent_geometry(cfg)  # the data sizes, checked before a minute of training
    meta = train_digits_extractor(out, seed=args.seed, data_cfg=cfg.data, verbose=True)
    print(f"digits CNN: held-out accuracy {meta['held_out_accuracy']:.4f} ({meta['held_out_images']} images, "
          f"{meta['train_seconds']} s) -> {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from harness.sweep.launch import launch_sweep, plan_sweep
    from harness.sweep.plan import format_plan
    from harness.sweep.status import format_status

    if args.dry_run:
        print(format_plan(plan_sweep(args.name, args.overrides)))
        return 0
    rows = launch_sweep(args.name, args.overrides)
    print(format_status(rows))
    return 1 if any(r["state"] in ("failed", "interrupted") for r in rows) else 0  # so a script notices


def _status(args: argparse.Namespace) -> int:
    from harness.sweep.status import format_status, sweep_status

    print(format_status(sweep_status(args.sweep_dir)))
    return 0


def _predict_gflops(item: str, sweep_dirs: list[str]) -> tuple[str, float]:
    """`--predict` item -> (label, Gflops): a number of Gflops, or a model in conf/model composed with the sweep's
    dataset (its data config) and counted by `harness.flops.count_flops`."""
    try:
        return f"{float(item):g} Gflops", float(item)
    except ValueError:
        pass
    from harness.config import compose, config_groups, latent_geometry
    from harness.flops import count_flops
    from harness.report.collect import collect_results

    require(item in config_groups("model"), f"--predict {item}: neither a number of Gflops nor a model in conf/model "
                                            f"({', '.join(config_groups('model'))})")
    datasets = sorted(collect_results(sweep_dirs)["dataset"].dropna().astype(str).unique())
    data = [f"data={datasets[0]}"] if len(datasets) == 1 and datasets[0] in config_groups("data") else []
    cfg = compose([f"model={item}", *data])
    return item, float(count_flops(cfg.model, latent_geometry(cfg), say=to_stderr)["gflops"])


def _report(args: argparse.Namespace) -> int:
    from harness.report.render import write_report

    paths = write_report(args.sweep_dirs, args.out, step=args.step, overlay_paper=args.overlay_paper,
                         mix_extractors=args.mix_extractors, holdout=args.holdout,
                         predict=[_predict_gflops(item, args.sweep_dirs) for item in args.predict or []])
    print(f"report: {paths['html']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from harness.bench import format_bench, run_bench

    what, overrides = _names_and_overrides(args.what, args.overrides)
    run_bench(overrides, what=what, log=args.log, profile=args.profile,
              show=lambda result: print(format_bench(result), flush=True))  # printed before it is logged
    return 0


def _demo_bench(args: argparse.Namespace) -> int:
    import time

    from harness.demo_bench import format_demo_bench, run_demo_bench

    workdir = args.dir or Path("bench") / f"demo-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    row = run_demo_bench(args.seed, workdir, args.log, args.overrides, host_probe=not args.no_host_probe, say=to_stderr)
    print(format_demo_bench(row))
    return 0 if row["holds"] else 1


class OneLineErrors(argparse.ArgumentParser):
    """argparse, except that a usage error is one line like every other bad input (argparse prints its usage)."""

    def error(self, message: str):
        print(f"harness: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    overrides = dict(nargs="*", metavar="KEY=VALUE", help="Hydra-style config overrides")

    p = command("train", _train, "Train one DiT config (a Hydra app; -m for multirun).")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra arguments and overrides")

    p = command("dry-run", _dry_run, "Resolve a config, count params/tokens/Gflops/memory and take one real CPU step.")
    p.add_argument("overrides", **overrides)
    p.add_argument("--no-step", action="store_true", help="skip the forward/backward/optimizer step")

    p = command("flops", _flops, "Forward Gflops (fvcore) of a list of configs, or the paper's 12-config grid.")
    p.add_argument("--models", nargs="+", metavar="NAME", help="model names, e.g. DiT-XL/2 mini-S/2 (default: the paper grid)")
    p.add_argument("--ablation", action="store_true", help="the four conditioning variants of DiT-XL/2 instead")
    p.add_argument("--format", choices=("text", "csv", "json"), default="text")
    p.add_argument("overrides", **overrides)

    p = command("extract-latents", _extract_latents, "Encode an image folder into a sharded latent cache (out=DIR).")
    p.add_argument("overrides", **overrides)

    p = command("eval", _eval, "Sample from a checkpoint and compute FID: ckpt=PATH (a .pt or a run dir) "
                               "[out=DIR: results.jsonl there, default the checkpoint's run dir] "
                               "[step=N: the step to record, default the checkpoint's].")
    p.add_argument("overrides", **overrides)

    p = command("train-digits-cnn", _train_digits_cnn,
                "Retrain the digits CNN that FID uses on data=digits (reproducible, CPU, well under a minute).")
    # Required: a default of the shipped harness/assets/digits_cnn.pt would let a stray run overwrite a tracked file.
    p.add_argument("--out", required=True, metavar="FILE",
                   help="weights file to write; use it with eval.digits_weights=FILE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", **overrides)

    p = command("sweep", _sweep, "Launch a sweep from sweeps/ through Hydra multirun + submitit.")
    p.add_argument("name", help="a sweep definition in sweeps/ (e.g. demo, paper_grid)")
    p.add_argument("overrides", **overrides)
    p.add_argument("--dry-run", action="store_true", help="print the grid and one sbatch script; submit nothing")

    p = command("status", _status, "State of every run of a sweep.")
    p.add_argument("sweep_dir")

    p = command("report", _report, "Gflops-vs-FID report (report.md, report.html, figures) from sweep dirs.")
    p.add_argument("sweep_dirs", nargs="+")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="training step for the FID-vs-Gflops figure (default: last common)")
    p.add_argument("--overlay-paper", action="store_true", help="overlay the paper's 400K-step points")
    p.add_argument("--mix-extractors", action="store_true", help="allow FIDs of different feature extractors on one axis")
    p.add_argument("--holdout", metavar="CONFIG", default=None,
                   help="leave CONFIG out of the fit vs Gflops, predict it and report the error")
    p.add_argument("--predict", nargs="+", metavar="MODEL_OR_GFLOPS",
                   help="predict configs outside the grid: a model in conf/model (e.g. mini-B/8) or a number of Gflops")

    p = command("bench", _bench, "Time training, sampling, feature extraction and latent loading; MFU and memory.")
    p.add_argument("--what", nargs="+", default=["train", "sample", "features", "latents"], metavar="WHAT",
                   help="any of train, sample, features, latents (default: all)")
    p.add_argument("--log", default="bench/bench_log.jsonl", help="benchmark log to append to")
    p.add_argument("--profile", action="store_true", help="also profile the training step: top ops, GPU busy share")
    p.add_argument("overrides", **overrides)

    p = command("demo-bench", _demo_bench, "Run `make demo` for one seed in a new directory, time it and check its claim "
                                           "(r <= -0.8, val loss falling, 90% class accuracy, 15 minutes); exit 1 if "
                                           "it does not hold.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="a new or empty directory for the demo (default: "
                                               "bench/demo-seed<N>-<date>-<time>)")
    p.add_argument("--log", default="bench/demo_log.jsonl", help="benchmark log to append the row to")
    p.add_argument("--no-host-probe", action="store_true",
                   help="skip timing a mini-B/2 step before and after (about 15 s each)")
    p.add_argument("overrides", **overrides)
    return parser


def _harness_warnings_in_one_line() -> None:
    """The harness's own warnings (a skipped row, a value read as missing) as `harness: warning: ...`."""
    package, default = Path(__file__).parent, warnings.formatwarning
    if getattr(default, "harness_one_line", False):
        return

    def format_warning(message, category, filename, lineno, line=None):
        if Path(filename).is_relative_to(package):
            return f"harness: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    format_warning.harness_one_line = True
    warnings.formatwarning = format_warning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _harness_warnings_in_one_line()
    parser = build_parser()
    if argv[:1] == ["train"]:  # Hydra parses its own flags (-m, --config-dir, --cfg, ...)
        args = argparse.Namespace(func=_train, overrides=argv[1:])
    else:
        # Overrides may come after flags too (`harness sweep demo --dry-run launcher=slurm`).
        args, extras = parser.parse_known_args(argv)
        stray = [e for e in extras if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extras:
            args.overrides = [*args.overrides, *extras]
    try:
        return int(args.func(args) or 0)
    except HarnessError as err:
        print(f"harness: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the input: a path that cannot be made, a full disk, a permission
        print(f"harness: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
