"""Write the analysis notebooks (outputs empty): `python analysis/make_notebooks.py`.

The notebooks only call `harness.report` (its collect, stats and figures modules); every figure and
fit lives there, so the CLI report, the notebooks and the tests show the same thing. Each notebook's
first code cell sets SWEEP_DIR, which the environment variable HARNESS_SWEEP_DIR overrides (the tests
point it at a fixture sweep).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''\
# Parameters: the sweep dir(s) to analyse. HARNESS_SWEEP_DIR overrides (the tests set it).
import os

SWEEP_DIR = os.environ.get("HARNESS_SWEEP_DIR", "../sweeps_out/demo")
STEP = None  # training step for the Gflops figure; None: the last step every finished run reached'''

SETUP = '''\
%matplotlib inline
from harness.report import collect, figures, stats

df = collect.collect_results(SWEEP_DIR)
collect.check_extractors(df)  # refuses to mix FIDs of different feature extractors
print(collect.fid_description(df))'''

NOTEBOOKS = {
    "gflops_vs_fid.ipynb": [
        new_markdown_cell(
            "# Gflops vs FID\n\nDoes sample quality follow transformer Gflops (paper Fig. 8, r = -0.93 across the "
            "12 DiT models at 400K steps)? The results table, FID vs Gflops at one training step, the log-log "
            "power-law fit with its bootstrap interval, and the predicted FID of a config not in the grid."
        ),
        new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_code_cell('step, why = collect.pick_step(df, STEP)\nprint(why)\ncollect.run_table(df, step)'),
        new_code_cell('at = collect.rows_at_step(df, step)\nfit = stats.fit_power_law(at["gflops"], at["fid"])\n'
                      'print(fit.summary())\nfit'),
        new_code_cell("figures.plot_fid_vs_gflops(df, step)"),
        new_code_cell('# A config not in the grid: twice the largest Gflops evaluated. The interval is a\n'
                      '# regression prediction interval (stats.PREDICTION_INTERVAL).\n'
                      'gflops = 2 * at["gflops"].max()\nfid, lo, hi = stats.predict_fid(fit, gflops)\n'
                      'print(f"Gflops {gflops:.3g}: predicted FID {fid:.2f} [{lo:.2f}, {hi:.2f}]")'),
    ],
    "training_compute.ipynb": [
        new_markdown_cell(
            "# FID vs training compute\n\nTraining compute = Gflops x batch x steps x 3 (paper Fig. 9): "
            "FID of every config over training, the compute frontier (the best FID reached within each "
            "budget, and which config reached it), FID vs steps grouped by size and by patch (Fig. 6), "
            "and samples at each config's last checkpoint."
        ),
        new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
        new_code_cell(SETUP),
        new_code_cell("figures.plot_fid_vs_compute(df)"),
        new_code_cell("stats.compute_frontier(df)"),
        new_code_cell("figures.plot_fid_vs_steps(df)"),
        new_code_cell("figures.plot_sample_grid(df)"),
    ],
}


def write_notebooks(out_dir: Path = HERE) -> list[Path]:
    """Write every notebook in NOTEBOOKS under `out_dir`, with a python3 kernelspec and no outputs."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        })
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes nothing in git
            cell["id"] = f"{Path(name).stem.replace('_', '-')}-{i}"
        nbformat.validate(nb)
        path = Path(out_dir) / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in write_notebooks():
        print(path)
