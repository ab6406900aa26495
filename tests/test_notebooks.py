"""The analysis notebooks run top to bottom against a fixture sweep, in this venv's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from fixtures.sweep import make_fixture_sweep

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
NOTEBOOKS = ("gflops_vs_fid.ipynb", "training_compute.ipynb")
KERNEL = "harness-test-venv"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_fixture_sweep(tmp_path_factory.mktemp("nb") / "fixture")


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    """A kernelspec that runs ipykernel in the interpreter running the tests.

    On a fresh machine only `pip install -e .[test]` has run: no user kernelspec may exist, and one
    named python3 elsewhere on JUPYTER_PATH could point at another Python without the harness.
    """
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "harness venv", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_committed_notebooks_have_no_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(ANALYSIS / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "SWEEP_DIR" in code[0].source and "HARNESS_SWEEP_DIR" in code[0].source
        assert all(not c.outputs and c.execution_count is None for c in code), name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_fixture_sweep(name, sweep, venv_kernel, monkeypatch):
    monkeypatch.setenv("HARNESS_SWEEP_DIR", str(sweep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    NotebookClient(nb, kernel_name=venv_kernel, timeout=180,
                   resources={"metadata": {"path": str(ANALYSIS)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= (1 if name == "gflops_vs_fid.ipynb" else 3)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "fid_digits" in text
    if name == "gflops_vs_fid.ipynb":
        assert "Gflops vs FID: r = " in text and "predicted FID" in text
