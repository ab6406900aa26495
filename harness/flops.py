"""Forward Gflops of a DiT config, counted by fvcore the way the paper counts them.

One forward pass of ONE image (VAE excluded), one fused multiply-add = one flop. fvcore's jit
tracer does not know `aten::scaled_dot_product_attention`, so a handle here counts its two matmuls
(Q K^T and A V). Operators fvcore skips (elementwise ops, the embedding lookup) are reported; a
skipped matmul-like operator is a bug and raises.

Counts are cached per architecture + geometry in a JSON file ($HARNESS_CACHE_DIR/flops.json,
default ~/.cache/dit-harness/flops.json), so a grid is traced once. `flops_table` and `format_table`
back `harness flops`; the paper's numbers for comparison live in harness/reference/.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import time
import warnings
from pathlib import Path

from harness.config import CONF_DIR, Geometry, compose, config_groups, latent_geometry, with_paper_setting
from harness.errors import require
from harness.io import atomic_write_json, cache_root, read_json, text_table
from harness.progress import Say, quiet

# torch, fvcore and harness.model are imported where a count is traced: a fully cached
# `harness flops` never imports torch (seconds on a small CPU) and never composes a config.

# Bump when the counting changes, so cached counts from an older method are not reused.
COUNTER_VERSION = 3
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
PAPER_GEOMETRY = Geometry(input_size=32, in_channels=4, num_classes=1000)
ABLATION_MODEL = "DiT-XL/2"
ABLATION_CONDITIONINGS = ("in_context", "cross_attention", "adaln", "adaln_zero")
# Operators that multiply matrices (fvcore names, e.g. aten::addmm): none of them may go uncounted.
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "einsum", "tensordot")


def training_compute_flops(gflops: float, batch: int, steps: int) -> float:
    """Training compute as in the paper's Fig. 9: forward Gflops x batch x steps x 3 (backward ~ 2x forward)."""
    return gflops * 1e9 * batch * steps * 3


def sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: Q K^T plus A V, i.e. 2 T^2 d for self-attention.

    q is (..., L, E), k (..., S, E), v (..., S, Ev); the leading dims hold batch and heads, so the count
    is the same for any number of heads.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def is_matmul_op(name: str) -> bool:
    """Whether an operator multiplies matrices (matmuls, linear layers, convolutions, attention)."""
    op = name.split("::")[-1].strip("_")
    return op in MATMUL_OPS or "conv" in op or "attention" in op


def fvcore_count(model, inputs: tuple) -> tuple[int, dict[str, int]]:
    """(flops, {skipped operator: count}) of `model(*inputs)` by fvcore, with the SDPA handle registered.

    Raises RuntimeError if fvcore skipped a matmul-like operator: the count would be too low.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore imports torch.jit.script, deprecated in recent torch
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer warnings about Python values in the graph
        flops = int(analysis.total())
    skipped = {str(k): int(v) for k, v in sorted(analysis.unsupported_ops().items())}
    missed = [op for op in skipped if is_matmul_op(op)]
    if missed:
        raise RuntimeError(f"fvcore skipped matmul-like operators {missed}: the Gflops count would be too low")
    return flops, skipped


def _patch_conv_on_cpu(model):
    """Run a meta-device DiT's patch conv on the CPU and hand its output back to the meta device.

    PyTorch's meta convolution cannot be jit-traced (its shape checks see traced sizes); every other
    op of the DiT can. With this, fvcore still traces every op of the forward pass, at their real
    shapes, without doing the arithmetic (seconds for DiT-XL/2 otherwise). `aten::to` counts nothing.
    """
    import torch

    class PatchEmbedOnCpu(torch.nn.Module):
        def __init__(self, embed):
            super().__init__()
            self.embed = embed.to_empty(device="cpu")

        def forward(self, x):
            return self.embed(x).to("meta")

    model.x_embedder = PatchEmbedOnCpu(model.x_embedder)
    return model


def _trace_flops(model_cfg, geometry: Geometry, device: str = "meta") -> dict:
    """Count one forward pass of one image; device="cpu" runs it for real (same count, much slower)."""
    import torch

    from harness.model import build_model, count_params

    # Weights do not change the count: a meta model has none, a CPU one skips their initialisation.
    model = build_model(model_cfg, geometry, device=device, init_weights=False).eval()
    params = count_params(model)
    x = torch.zeros(1, geometry.in_channels, geometry.input_size, geometry.input_size)
    if device == "meta":
        model = _patch_conv_on_cpu(model)
    flops, skipped = fvcore_count(model, (x, torch.zeros(1, device=device), torch.zeros(1, dtype=torch.long, device=device)))
    return {
        "flops": flops,
        "gflops": flops / 1e9,
        "params": params,
        "tokens": geometry.tokens(int(model_cfg.patch_size)),
        "unsupported_ops": skipped,
    }


#################################################################################
#                                  The cache                                    #
#################################################################################


def cache_path() -> Path:
    """The JSON cache of counts: $HARNESS_CACHE_DIR/flops.json, default ~/.cache/dit-harness/flops.json."""
    return cache_root() / "flops.json"


def _load_cache() -> dict:
    """{"counts": {architecture key: count}, "rows": {"conf": fingerprint, "entries": {overrides: row}}}.

    Empty when the file is absent, torn or from another counter version.
    """
    try:
        cache = read_json(cache_path(), default=None)
    except (OSError, ValueError):  # unreadable: count again
        cache = None
    if not isinstance(cache, dict) or cache.get("version") != COUNTER_VERSION:
        return {"counts": {}, "rows": {}}
    return {"counts": dict(cache.get("counts") or {}), "rows": dict(cache.get("rows") or {})}


def _update_cache(counts: dict | None = None, rows: dict | None = None) -> None:
    """Merge new counts and table rows into the cache file, atomically.

    The file is re-read first (another process may have added counts meanwhile). `rows` is
    {"conf": fingerprint, "entries": {...}}; rows of an older conf/ fingerprint are dropped.
    """
    cache = _load_cache()
    cache["counts"].update(counts or {})
    if rows:
        if cache["rows"].get("conf") == rows["conf"]:
            rows = {"conf": rows["conf"], "entries": {**cache["rows"].get("entries", {}), **rows["entries"]}}
        cache["rows"] = rows
    try:
        atomic_write_json(cache_path(), {"version": COUNTER_VERSION, **cache})
    except OSError as err:  # a read-only home must not stop a count
        warnings.warn(f"could not write the flops cache {cache_path()}: {err}")


def cache_key(model_cfg, geometry: Geometry) -> str:
    """Everything that changes the count (not the name, not label dropout)."""
    arch = {
        "depth": int(model_cfg.depth),
        "hidden_size": int(model_cfg.hidden_size),
        "num_heads": int(model_cfg.num_heads),
        "patch_size": int(model_cfg.patch_size),
        "conditioning": str(model_cfg.get("conditioning", "adaln_zero")),
        "mlp_ratio": float(model_cfg.get("mlp_ratio", 4.0)),
        "learn_sigma": bool(model_cfg.get("learn_sigma", True)),
        "input_size": geometry.input_size,
        "in_channels": geometry.in_channels,
        "num_classes": geometry.num_classes,
    }
    return json.dumps(arch, sort_keys=True)


def cached_count(model_cfg, geometry: Geometry) -> dict | None:
    """The cached count of a config, or None: `count_flops` would trace it. The config is checked first."""
    from harness.model import check_model_config

    check_model_config(model_cfg, geometry)
    return _load_cache()["counts"].get(cache_key(model_cfg, geometry))


def count_flops(model_cfg, geometry: Geometry, use_cache: bool = True, say: Say = quiet) -> dict:
    """{gflops, params, tokens, unsupported_ops} of one forward pass of one image, cached per config.

    `say` gets a line when the count is traced (seconds to a minute), not when it comes from the cache.
    """
    cached = cached_count(model_cfg, geometry)
    if use_cache and cached is not None:
        return dict(cached)
    say(f"counting Gflops with fvcore (tracing {model_cfg.name}) ...")
    result = _trace_flops(model_cfg, geometry)
    if use_cache:
        _update_cache(counts={cache_key(model_cfg, geometry): result})
    return dict(result)


def _conf_fingerprint() -> str:
    """A hash of every file under conf/: a cached table row is only reused while the configs are unchanged."""
    digest = hashlib.sha256()
    for path in sorted(p for p in CONF_DIR.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(CONF_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


#################################################################################
#                           The paper's numbers, tables                         #
#################################################################################


@functools.lru_cache(maxsize=None)
def _read_reference(name: str) -> tuple[dict, ...]:
    """The rows of a shipped reference CSV, read once per process (a table asks for them per row)."""
    with open(REFERENCE_DIR / name, newline="") as f:
        return tuple(csv.DictReader(f))


def paper_models() -> list[str]:
    """The paper's 12 configs, DiT-S/8 ... DiT-XL/2, in Table 4's order."""
    return [r["model"] for r in _read_reference("paper_table4.csv")]


def paper_gflops(model: str, conditioning: str = "adaln_zero") -> float | None:
    """The paper's Gflops of a named config at 256px (Table 4; Sec. 3.2 for the conditioning variants)."""
    if conditioning == "adaln_zero":
        rows = {r["model"]: r for r in _read_reference("paper_table4.csv")}
        return float(rows[model]["gflops"]) if model in rows else None
    rows = {(r["model"], r["conditioning"]): r for r in _read_reference("paper_conditioning_ablation.csv")}
    row = rows.get((model, conditioning))
    return float(row["gflops"]) if row else None


def is_paper_setting(cfg) -> bool:
    """Whether the paper's numbers apply: a paper architecture on 32x32x4 latents with 1000 classes."""
    m = cfg.model
    return latent_geometry(cfg) == PAPER_GEOMETRY and float(m.mlp_ratio) == 4.0 and bool(m.learn_sigma)


def _counted_row(cfg) -> dict:
    """The counted part of a table row for a composed config (what the row cache holds)."""
    m = cfg.model
    counted = count_flops(m, latent_geometry(cfg))
    return {
        "model": str(m.name),
        "size": str(m.size),
        "patch": int(m.patch_size),
        "conditioning": str(m.conditioning),
        "tokens": counted["tokens"],
        "params": counted["params"],
        "gflops": counted["gflops"],
        "paper_setting": is_paper_setting(cfg),
    }


def _with_paper(counted: dict) -> dict:
    """A full table row: the counted part plus the paper's Gflops and the difference in percent."""
    row = {k: v for k, v in counted.items() if k != "paper_setting"}
    paper = paper_gflops(row["model"], row["conditioning"]) if counted["paper_setting"] else None
    row["paper_gflops"] = paper
    row["diff_pct"] = round(100.0 * (row["gflops"] - paper) / paper, 3) if paper else None
    row["gflops"] = float(f"{row['gflops']:.6g}")  # significant digits: mini models count thousandths of a Gflop
    return row


def flops_table(models: list[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
                conditioning_ablation: bool = False, say: Say = quiet) -> list[dict]:
    """One row per config: model, size, patch, conditioning, tokens, params, gflops, paper_gflops, diff_pct.

    models=None is the paper's 12 configs. Paper configs (DiT-*) are composed with
    `experiment=imagenet256` (32x32x4 latents, 1000 classes) unless the overrides choose an
    experiment; other models (mini-*, custom) use the default config plus `overrides`.
    conditioning_ablation=True gives each model (default DiT-XL/2) under the four conditionings.
    Rows are cached by their overrides while no file under conf/ changes, so a repeated table
    needs neither Hydra nor torch. `say` gets a line per config as it is counted (its Gflops, traced or cached).
    """
    known = config_groups("model")
    if models is None:
        models = [ABLATION_MODEL] if conditioning_ablation else paper_models()
    for name in models:
        require(name in known, f"unknown model {name!r}; allowed: {', '.join(known)}")
    overrides = list(overrides)
    variants = [[f"model.conditioning={c}"] for c in ABLATION_CONDITIONINGS] if conditioning_ablation else [[]]

    fingerprint = _conf_fingerprint()
    cached = _load_cache()["rows"]
    cached = cached.get("entries", {}) if cached.get("conf") == fingerprint else {}
    new, rows = {}, []
    for name in models:
        for variant in variants:
            config_overrides = with_paper_setting([f"model={name}", *overrides, *variant])
            key = json.dumps(config_overrides)
            how = "cached"
            if key not in cached:
                start, cfg = time.perf_counter(), compose(config_overrides)
                traced = cached_count(cfg.model, latent_geometry(cfg)) is None
                new[key] = cached[key] = _counted_row(cfg)
                if traced:
                    how = f"traced in {time.perf_counter() - start:.1f} s"
            row = _with_paper(cached[key])
            rows.append(row)
            label = f"{name} {row['conditioning']}" if conditioning_ablation else name
            say(f"{label}: {row['gflops']:.4g} Gflops ({how})")
    if new:
        _update_cache(rows={"conf": fingerprint, "entries": new})
    return rows


COLUMNS = ["model", "size", "patch", "conditioning", "tokens", "params", "gflops", "paper_gflops", "diff_pct"]


def format_table(rows: list[dict], fmt: str = "text") -> str:
    """The rows as an aligned text table, CSV or JSON."""
    require(fmt in ("text", "csv", "json"), f"format={fmt!r} is not one of text, csv, json")
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    header = ["model", "conditioning", "tokens", "params (M)", "Gflops", "paper", "diff %"]
    def gflops(value: float) -> str:  # the paper's two decimals; three significant digits below 1 (mini models)
        return f"{value:.2f}" if value >= 1 else f"{value:.3g}"

    body = [[
        r["model"], r["conditioning"], str(r["tokens"]), f"{r['params'] / 1e6:.1f}", gflops(r["gflops"]),
        "" if r["paper_gflops"] is None else gflops(r["paper_gflops"]),
        "" if r["diff_pct"] is None else f"{r['diff_pct']:+.2f}",
    ] for r in rows]
    lines = text_table(header, body, left={0, 1})
    lines.append("Gflops: fvcore, one forward pass of one image, 1 fused multiply-add = 1 flop.")
    return "\n".join(lines)
