"""Gflops by fvcore against the paper (Table 4 and the conditioning ablation), the cache, and `harness flops`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness import flops
from harness.cli import main
from harness.config import compose, latent_geometry
from harness.flops import (
    count_flops,
    flops_table,
    format_table,
    fvcore_count,
    is_matmul_op,
    training_compute_flops,
)

DATA = Path(__file__).resolve().parent / "data"


def read_csv(name: str) -> list[dict]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh cache for this module: the paper grid is really counted once per test session."""
    path = tmp_path_factory.mktemp("flops-cache")
    old = os.environ.get("HARNESS_CACHE_DIR")
    os.environ["HARNESS_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HARNESS_CACHE_DIR", None)
    else:
        os.environ["HARNESS_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def paper_grid(cache_dir):
    assert not (cache_dir / "flops.json").exists()
    return {r["model"]: r for r in flops_table(None, [])}


@pytest.fixture(scope="module")
def ablation(paper_grid):
    return {r["conditioning"]: r for r in flops_table(None, [], conditioning_ablation=True)}


def test_paper_grid_matches_table4(paper_grid):
    table = read_csv("dit_paper_table4.csv")
    assert list(paper_grid) == [r["model"] for r in table]
    for ref in table:
        row = paper_grid[ref["model"]]
        assert row["gflops"] == pytest.approx(float(ref["gflops"]), rel=0.005), ref["model"]
        assert abs(row["params"] / 1e6 - float(ref["params_m"])) < 1.0, ref["model"]
        assert row["tokens"] == (32 // int(ref["patch"])) ** 2
        assert row["paper_gflops"] == float(ref["gflops"])
        assert abs(row["diff_pct"]) < 0.5
        rounding = 100 * 5e-5 / row["paper_gflops"]  # the table's Gflops are rounded to 4 decimals, diff_pct is not
        assert row["diff_pct"] == pytest.approx(100 * (row["gflops"] - row["paper_gflops"]) / row["paper_gflops"],
                                                abs=rounding + 1e-3)


def test_conditioning_variants_match_ablation(ablation):
    for ref in read_csv("dit_conditioning_ablation.csv"):
        row = ablation[ref["conditioning"]]
        assert row["model"] == "DiT-XL/2"
        assert row["gflops"] == pytest.approx(float(ref["gflops"]), rel=0.01), ref["conditioning"]
        assert row["params"] / 1e6 == pytest.approx(float(ref["params_m"]), rel=0.01), ref["conditioning"]
    # cross-attention costs ~15% more than adaLN-Zero; the others are within 1% of it
    assert 1.12 < ablation["cross_attention"]["gflops"] / ablation["adaln_zero"]["gflops"] < 1.18


def test_no_matmul_skipped_and_skips_reported(ablation, cache_dir):
    counts = json.loads((cache_dir / "flops.json").read_text())["counts"]
    assert len(counts) == 15  # 12 paper configs + 3 more conditionings of DiT-XL/2
    for entry in counts.values():
        skipped = entry["unsupported_ops"]
        assert skipped and not any(is_matmul_op(op) for op in skipped)
        assert "aten::scaled_dot_product_attention" not in skipped
        assert entry["gflops"] == entry["flops"] / 1e9


def test_sdpa_counted_as_2_T2_d_for_any_heads():
    class SelfAttention(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def forward(self, x):
            q = x.reshape(1, x.shape[1], self.heads, -1).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q)

    T, d = 24, 48
    for heads in (1, 4, 12):
        total, _ = fvcore_count(SelfAttention(heads), (torch.randn(1, T, d),))
        assert total == 2 * T * T * d


def test_skipped_matmul_raises():
    class Unknown(torch.nn.Module):
        def forward(self, a):
            return torch.baddbmm(a, a, a)  # fvcore has no handle for baddbmm

    with pytest.raises(RuntimeError, match="baddbmm"):
        fvcore_count(Unknown(), (torch.randn(2, 3, 3),))
    assert is_matmul_op("aten::_convolution") and is_matmul_op("aten::matmul") and not is_matmul_op("aten::gelu")


def test_cached_counts_and_rows_skip_tracing_and_hydra(paper_grid, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(flops, "_trace_flops", boom)
    monkeypatch.setattr(flops, "compose", boom)
    again = flops_table(None, [])
    assert [r["gflops"] for r in again] == [r["gflops"] for r in paper_grid.values()]
    monkeypatch.undo()
    monkeypatch.setattr(flops, "_trace_flops", boom)
    cfg = compose(["experiment=imagenet256", "model=DiT-S/8", "model.class_dropout_prob=0.2"])
    assert count_flops(cfg.model, latent_geometry(cfg))["gflops"] == pytest.approx(paper_grid["DiT-S/8"]["gflops"], abs=1e-4)


def test_small_config_counts_and_torn_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    (tmp_path / "flops.json").write_text('{"version": 3, "counts": {')  # torn by a kill
    cfg = compose(["model=custom", "model.depth=1", "model.hidden_size=16", "model.num_heads=2",
                   "model.patch_size=4", "data.image_size=8"])
    counted = count_flops(cfg.model, latent_geometry(cfg))
    T, d, pc = 4, 16, 16 * 2  # tokens, hidden, patch outputs (p*p*2C)
    block = 12 * T * d * d + 2 * T * T * d + 6 * d * d
    embed = T * d * 16 + 256 * d + d * d  # patch conv, timestep MLP
    final = 2 * d * d + T * d * pc
    norms = 3 * 4 * T * d  # LayerNorm counted 4 flops per element by fvcore
    assert counted["flops"] == block + embed + final + norms
    assert counted["tokens"] == 4
    assert json.loads((tmp_path / "flops.json").read_text())["version"] == flops.COUNTER_VERSION


def test_the_cache_is_keyed_by_architecture_version_and_conf(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    small = ["model=custom", "model.depth=1", "model.hidden_size=16", "model.num_heads=2", "model.patch_size=4",
             "data.image_size=8"]
    counts = {}
    for ratio in (2, 4):  # one cache, two MLP ratios: two counts, each the uncached one
        cfg = compose([*small, f"model.mlp_ratio={ratio}"])
        counts[ratio] = count_flops(cfg.model, latent_geometry(cfg))["flops"]
        assert counts[ratio] == count_flops(cfg.model, latent_geometry(cfg), use_cache=False)["flops"]
    assert counts[2] < counts[4]
    # A count cached by another counter version is not trusted.
    cache = json.loads((tmp_path / "flops.json").read_text())
    key = next(iter(cache["counts"]))
    cache["version"] = flops.COUNTER_VERSION - 1
    cache["counts"][key] = {**cache["counts"][key], "flops": 999, "gflops": 999}
    (tmp_path / "flops.json").write_text(json.dumps(cache))
    cfg = compose([*small, f"model.mlp_ratio={json.loads(key)['mlp_ratio']:g}"])
    assert count_flops(cfg.model, latent_geometry(cfg))["flops"] != 999
    # Table rows are recomposed once anything under conf/ changes.
    flops_table(["mini-S/8"], [])
    composed = []
    monkeypatch.setattr(flops, "compose", lambda overrides, _real=flops.compose: composed.append(1) or _real(overrides))
    flops_table(["mini-S/8"], [])
    assert composed == []
    monkeypatch.setattr(flops, "_conf_fingerprint", lambda: "conf changed")
    flops_table(["mini-S/8"], [])
    assert composed == [1]


@pytest.mark.parametrize("conditioning", ["adaln_zero", "adaln", "cross_attention", "in_context"])
def test_meta_trace_counts_what_a_real_forward_counts(conditioning):
    """The cheap count (meta device, nothing computed) equals fvcore on a real CPU forward pass."""
    cfg = compose(["model=mini-S/2", f"model.conditioning={conditioning}"])
    geometry = latent_geometry(cfg)
    assert flops._trace_flops(cfg.model, geometry) == flops._trace_flops(cfg.model, geometry, device="cpu")


def test_training_compute():
    assert training_compute_flops(118.64, 256, 400_000) == pytest.approx(118.64e9 * 256 * 400_000 * 3)


def test_format_table(paper_grid):
    rows = list(paper_grid.values())[:2]
    text = format_table(rows, "text")
    assert "DiT-S/8" in text and "Gflops" in text and len(text.splitlines()) == 5
    lines = format_table(rows, "csv").splitlines()
    assert lines[0] == "model,size,patch,conditioning,tokens,params,gflops,paper_gflops,diff_pct"
    assert lines[1].startswith("DiT-S/8,S,8,adaln_zero,16,")
    assert json.loads(format_table(rows, "json")) == rows


def test_cli_flops_json(paper_grid, capsys):
    assert main(["flops", "--models", "DiT-S/8", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["model"] == "DiT-S/8" and rows[0]["tokens"] == 16
    assert rows[0]["gflops"] == pytest.approx(0.36, rel=0.005) and rows[0]["paper_gflops"] == 0.36


def test_cli_flops_mini_model_has_no_paper_column(cache_dir, capsys):
    assert main(["flops", "--models", "mini-S/4", "--format", "csv"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert row[0] == "mini-S/4" and row[4] == "16" and row[7] == "" and float(row[6]) > 0


def test_cli_flops_says_each_config_on_stderr_as_it_is_counted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    assert main(["flops", "--models", "mini-S/4", "mini-S/2", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == ",".join(flops.COLUMNS) and len(out.splitlines()) == 3  # the table alone
    gflops = {row["model"]: row["gflops"] for row in csv.DictReader(out.splitlines())}
    lines = err.splitlines()
    assert [line.split(" (traced in ")[0] for line in lines] == [
        f"{model}: {float(gflops[model]):.4g} Gflops" for model in ("mini-S/4", "mini-S/2")]
    assert all(line.endswith(" s)") for line in lines)
    said = []
    flops_table(["mini-S/4"], [], conditioning_ablation=True, say=said.append)  # adaln_zero's count is cached
    assert [line.split(": ")[0] for line in said] == [f"mini-S/4 {c}" for c in flops.ABLATION_CONDITIONINGS]
    assert said[-1].endswith(" Gflops (cached)") and "(traced in" in said[0]


@pytest.mark.parametrize("argv, words", [
    (["flops", "--models", "DiT-Q/3"], ["unknown model 'DiT-Q/3'", "DiT-XL/2"]),
    (["flops", "model.conditioning=film", "--models", "mini-S/2"], ["model.conditioning", "in_context"]),
    (["flops", "model.patch_size=3", "--models", "mini-S/2"], ["model.patch_size=3", "16"]),
    # Overrides after --models are overrides, not model names.
    (["flops", "--ablation", "--models", "DiT-S/8", "data.image_size=250"], ["data.image_size=250 is not divisible"]),
])
def test_cli_flops_bad_input(cache_dir, capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: ") and "\n" not in err
    for word in words:
        assert word in err
