"""The sweep report: results table, Gflops-vs-FID fits, the DiT paper's scaling figures, report files.

Everything a researcher looks at after a sweep comes from here, so the CLI (`harness report`), the
notebooks in `analysis/` and the tests call the same functions:

- `harness.report.collect`: `collect_results(sweep_dirs)`, one tidy row per run x evaluated step;
- `harness.report.stats`: `fit_power_law`, `predict_fid`, `compute_frontier`;
- `harness.report.figures`: FID vs Gflops (Fig. 8), vs steps (Fig. 6), vs training compute (Fig. 9), samples;
- `harness.report.render`: `write_report(sweep_dirs, out_dir)`, report.md, a self-contained
  report.html, results.csv, fits.json and the figures as PNG and SVG.

Nothing is imported here: import the module you need.
"""
