"""Training: `loop` (the Trainer and its loop), built from `runtime` (device, distributed, fast paths, the shared
inference forward), `step` (model, EMA, optimizer, the update), `checkpoint` (save, resume, keep-last) and
`preemption` (signals, requeue); `app` is the Hydra entry point of `harness train`, `dry_run` the dry run."""
