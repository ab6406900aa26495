"""Evaluation: samples of a DiT and their FID, computed in-process by torch-fidelity.

- `harness.evaluate.sampling`: seeded, label-balanced, batched sampling (the same images on any number of
  ranks), stoppable between batches; sample grids and ADM-style .npz files.
- `harness.evaluate.fid`: the feature extractor of a config (Inception, or the digits CNN of
  `harness.digits_cnn`), reference statistics and their cache, FID / IS / precision-recall, and
  `check_eval_config`, the check of `eval` before any sampling.
- `harness.evaluate.run`: evaluating a run's in-memory EMA model (training) or a checkpoint file
  (`harness eval`), each appending one `harness.run_dir.ResultRow` to the run dir.

Nothing is imported here: import the module you need. `harness.config.checks` needs only `fid`, and `run`
imports `harness.config.checks`; importing `run` here would close that circle.
"""
