"""The DiT model: released-checkpoint layout, adaLN-Zero identity at init, patch order, loading, config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.config import CONDITIONINGS, Geometry, compose, latent_geometry
from harness.config.checks import validate
from harness.errors import HarnessError
from harness.model import (
    DiT,
    TimestepEmbedder,
    build_model,
    check_model_config,
    count_params,
    load_weights,
    modulate,
)

DATA = Path(__file__).resolve().parent / "data"


def tiny(conditioning: str = "adaln_zero", learn_sigma: bool = True, **kw) -> DiT:
    args = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, learn_sigma=learn_sigma, conditioning=conditioning)
    args.update(kw)
    return DiT(**args)


def perturb(model: DiT, seed: int = 0) -> DiT:
    """Random weights everywhere (the zero-initialised layers too), so outputs depend on every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def inputs(n: int = 3, channels: int = 3, size: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen).float()
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, t, y


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C): row-major patches, each flattened in (p, p, C) order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


# ----------------------------------------------------------------------------- shapes and layout

@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shape_every_variant(conditioning, learn_sigma):
    model = perturb(tiny(conditioning, learn_sigma)).eval()
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert model.out_channels == (6 if learn_sigma else 3) and model.num_classes == 10
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-XL/2"])
def test_state_dict_matches_released_layout(name):
    """Exactly the released keys and shapes (built on the meta device: no memory, no init)."""
    layout = json.loads((DATA / "dit_checkpoint_layout.json").read_text())[name]
    expected = {}
    for key, shape in layout.items():
        if key.startswith("_"):
            continue
        if key.startswith("blocks.0."):
            for i in range(layout["_num_blocks"]):
                expected[f"blocks.{i}." + key[len("blocks.0."):]] = tuple(shape)
        else:
            expected[key] = tuple(shape)
    cfg = compose(["experiment=imagenet256", f"model={name}"])
    model = build_model(cfg.model, latent_geometry(cfg), device="meta")
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert found == expected
    assert not model.pos_embed.requires_grad


def test_param_counts_of_the_paper_and_variants():
    table = {r["model"]: float(r["params_m"]) for r in csv_rows("dit_paper_table4.csv")}
    for name in ("DiT-S/8", "DiT-B/4", "DiT-XL/2"):
        cfg = compose(["experiment=imagenet256", f"model={name}"])
        assert abs(count_params(build_model(cfg.model, latent_geometry(cfg), device="meta")) / 1e6 - table[name]) < 1.0
    for row in csv_rows("dit_conditioning_ablation.csv"):
        cfg = compose(["experiment=imagenet256", "model=DiT-XL/2", f"model.conditioning={row['conditioning']}"])
        params = count_params(build_model(cfg.model, latent_geometry(cfg), device="meta")) / 1e6
        assert params == pytest.approx(float(row["params_m"]), rel=0.01), row


def csv_rows(name: str) -> list[dict]:
    import csv

    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- adaLN-Zero and block facts

def test_adaln_zero_blocks_are_identity_and_output_zero_at_init():
    torch.manual_seed(0)
    model = tiny("adaln_zero").eval()
    x, t, y = inputs(n=4)
    assert torch.equal(model(x, t, y), torch.zeros(4, 6, 8, 8))
    for _ in range(3):  # any tokens and any conditioning vector, not only the model's own
        tokens, c = torch.randn(4, 16, 32), 10 * torch.randn(4, 32)
        for block in model.blocks:
            assert torch.equal(block(tokens, c), tokens)


def test_adaln_variant_is_not_zero_initialised():
    torch.manual_seed(0)
    model = tiny("adaln").eval()
    assert model(*inputs()).abs().sum() > 0
    assert model.blocks[0].adaLN_modulation[1].out_features == 4 * 32


def test_adaln_zero_chunk_order_and_modulation():
    """6D regression split as shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; x * (1 + scale) + shift."""
    torch.manual_seed(0)
    block = perturb(tiny("adaln_zero")).blocks[0]
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        block.adaLN_modulation[1](torch.nn.functional.silu(c)).split(32, dim=1))
    norm = torch.nn.functional.layer_norm
    h = x + gate_msa[:, None] * block.attn(norm(x, (32,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None])
    expected = h + gate_mlp[:, None] * block.mlp(norm(h, (32,), eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
    torch.testing.assert_close(block(x, c), expected)
    torch.testing.assert_close(modulate(x, shift_msa, scale_msa), x * (1 + scale_msa[:, None]) + shift_msa[:, None])


def test_final_layer_chunk_order_and_tanh_gelu():
    """The final layer splits its regression as (shift, scale); the MLP's GELU is the tanh approximation."""
    torch.manual_seed(0)
    model = perturb(tiny("adaln_zero"))
    final, x, c = model.final_layer, torch.randn(2, 16, 32), torch.randn(2, 32)
    shift, scale = final.adaLN_modulation[1](torch.nn.functional.silu(c)).split(32, dim=1)
    norm = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
    torch.testing.assert_close(final(x, c), final.linear(norm * (1 + scale[:, None]) + shift[:, None]))
    mlp = model.blocks[0].mlp
    gelu = torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh")
    torch.testing.assert_close(mlp(x), mlp.fc2(gelu), rtol=1e-6, atol=1e-6)


def test_in_context_conditioning_appends_two_tokens_and_drops_them():
    """In-context: t and y become tokens T and T+1 of the sequence; the final layer sees the first T only."""
    torch.manual_seed(0)
    model = perturb(tiny("in_context")).eval()
    x, t, y = inputs()
    seen = {}
    model.final_layer.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0]))
    last = model.blocks[-1]
    last.register_forward_hook(lambda module, args, out: seen.update(sequence=out))
    model(x, t, y)
    assert seen["sequence"].shape[1] == model.num_patches + 2
    assert torch.equal(seen["tokens"], seen["sequence"][:, :model.num_patches])
    tokens = model.x_embedder(x) + model.pos_embed
    conditioning = torch.stack([model.t_embedder(t), model.y_embedder(y, False, None)], dim=1)
    first_input = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: first_input.update(x=args[0]))
    model(x, t, y)
    torch.testing.assert_close(first_input["x"], torch.cat([tokens, conditioning], dim=1))


def test_attention_heads_split_like_released_qkv():
    """qkv output channels are (3, heads, head_dim): head h of q is rows [h*hd, (h+1)*hd) of the q third."""
    torch.manual_seed(0)
    attn = perturb(tiny()).blocks[0].attn
    x = torch.randn(2, 16, 32)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 16, 32))
    torch.testing.assert_close(attn(x), expected)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # cos half first, then sin
    k = 17
    freq = math.exp(-math.log(10000) * k / 128)
    assert emb[1, k].item() == pytest.approx(math.cos(3.5 * freq), abs=1e-5)
    assert emb[2, 128 + k].item() == pytest.approx(math.sin(999.0 * freq), abs=1e-4)


def test_pos_embed_is_fixed_2d_sincos():
    model = tiny(hidden_size=32)  # 4x4 grid, D/4 = 8 frequencies
    pe = model.pos_embed[0]
    omega = 1.0 / 10000 ** (np.arange(8) / 8)
    row, col = 2, 3
    token = pe[row * 4 + col].double().numpy()
    np.testing.assert_allclose(token[:8], np.sin(col * omega), atol=1e-6)   # first half: the column
    np.testing.assert_allclose(token[8:16], np.cos(col * omega), atol=1e-6)
    np.testing.assert_allclose(token[16:24], np.sin(row * omega), atol=1e-6)  # second half: the row
    np.testing.assert_allclose(token[24:], np.cos(row * omega), atol=1e-6)


def test_label_dropout_null_row():
    model = tiny(class_dropout_prob=0.5)
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.arange(10)
    forced = emb(labels, train=False, force_drop_ids=(labels % 2 == 0).long())
    torch.testing.assert_close(forced[0], emb.embedding_table.weight[10])
    torch.testing.assert_close(forced[1], emb.embedding_table.weight[1])
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[:10])
    torch.manual_seed(0)
    dropped = torch.stack([(emb(labels, train=True) == emb.embedding_table.weight[10]).all(1) for _ in range(200)])
    assert 0.4 < dropped.float().mean().item() < 0.6


def test_official_initialisation():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=100)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    fc1 = model.blocks[0].mlp.fc1.weight
    assert fc1.abs().max().item() <= math.sqrt(6 / (64 + 256)) and fc1.std().item() > 0.03  # xavier uniform
    assert torch.count_nonzero(model.blocks[0].mlp.fc1.bias) == 0
    for t in (model.final_layer.linear.weight, model.final_layer.adaLN_modulation[1].weight,
              model.blocks[1].adaLN_modulation[1].bias):
        assert torch.count_nonzero(t) == 0


# ----------------------------------------------------------------------------- patches

@pytest.mark.parametrize("p", [1, 2, 4])
def test_unpatchify_inverts_patch_order(p):
    model = tiny(learn_sigma=False, patch_size=p)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.unpatchify(patchify(x, p)), x)


def test_patch_embed_token_order_matches_unpatchify():
    """With the patch conv set to copy each patch's (p, p, C) values, patches go in and come back unchanged."""
    p, c = 2, 4
    model = DiT(input_size=8, patch_size=p, in_channels=c, hidden_size=p * p * c, depth=1, num_heads=2,
                num_classes=10, learn_sigma=False)
    with torch.no_grad():
        weight = torch.zeros(p * p * c, c, p, p)
        for i in range(p):
            for j in range(p):
                for ch in range(c):
                    weight[(i * p + j) * c + ch, ch, i, j] = 1.0
        model.x_embedder.proj.weight.copy_(weight)
        model.x_embedder.proj.bias.zero_()
    x = torch.randn(2, c, 8, 8)
    tokens = model.x_embedder(x)
    torch.testing.assert_close(tokens, patchify(x, p))
    torch.testing.assert_close(model.unpatchify(tokens), x)


def test_residual_stream_is_token_major_in_every_block():
    """LayerNorm reduces over D: each block's input must hold a token's D values side by side. The patch
    conv's channel-major output, left as a transposed view, made every residual add inherit it."""
    model = perturb(tiny())
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape, args[0].stride())))
    x, t, y = inputs()
    model(x, t, y)
    tokens, dim = model.num_patches, model.pos_embed.shape[-1]
    assert seen == [((3, tokens, dim), (tokens * dim, dim, 1))] * len(model.blocks)


# ----------------------------------------------------------------------------- options

def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = perturb(tiny("adaln_zero"))
    x, t, y = inputs()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(x, t, y, force_drop_ids=torch.zeros(3)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_build_model_from_config_and_cheap_paths():
    cfg = compose(["model=mini-S/2"])
    geometry = latent_geometry(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, geometry)
    assert isinstance(model, DiT) and model.in_channels == geometry.in_channels == 1
    assert model.patch_size == 2 and len(model.blocks) == cfg.model.depth
    assert model(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 500.0]), torch.tensor([0, 9])).abs().sum() == 0
    torch.testing.assert_close(model.pos_embed, tiny(hidden_size=96, in_channels=1, input_size=16).pos_embed)
    meta = build_model(cfg.model, geometry, device="meta")
    assert count_params(meta) == count_params(model)
    empty = build_model(cfg.model, geometry, init_weights=False)
    torch.testing.assert_close(empty.pos_embed, model.pos_embed)


# ----------------------------------------------------------------------------- load_weights

def test_load_released_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    src = perturb(tiny(), seed=3).eval()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(src.state_dict(), path)
    dst = tiny().eval()
    load_weights(path, dst)
    x, t, y = inputs()
    assert torch.equal(dst(x, t, y), src(x, t, y))


def test_load_our_checkpoint_picks_ema_or_model(tmp_path):
    ema, raw = perturb(tiny(), seed=1), perturb(tiny(), seed=2)
    ckpt = {"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 7,
            "rng": {"numpy": np.random.get_state()}, "config": "model: {}"}
    path = tmp_path / "step_0000007.pt"
    torch.save(ckpt, path)
    dst = tiny()
    load_weights(path, dst)
    torch.testing.assert_close(dst.state_dict(), ema.state_dict())
    load_weights(path, dst, which="model")
    torch.testing.assert_close(dst.state_dict(), raw.state_dict())
    only_raw = tmp_path / "raw_only.pt"
    torch.save({"model": raw.state_dict(), "step": 1}, only_raw)
    with pytest.raises(HarnessError, match="has no 'ema' weights"):  # never the raw weights in their place
        load_weights(only_raw, dst)
    with pytest.raises(HarnessError, match="which='last' is not one of ema, model"):
        load_weights(path, dst, which="last")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_load_weights_saved_from_ddp_or_compiled_models(tmp_path, prefix):
    src = perturb(tiny(), seed=4)
    torch.save({prefix + key: value for key, value in src.state_dict().items()}, tmp_path / "wrapped.pt")
    dst = tiny()
    load_weights(tmp_path / "wrapped.pt", dst)
    torch.testing.assert_close(dst.state_dict(), src.state_dict())


def test_load_into_meta_model(tmp_path):
    src = perturb(tiny())
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with torch.device("meta"):
        dst = tiny()
    load_weights(tmp_path / "w.pt", dst)
    torch.testing.assert_close(dst.state_dict(), src.state_dict())


def _load_error(path, model=None) -> str:
    with pytest.raises(HarnessError) as err:
        load_weights(path, model or tiny())
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_bad_files(tmp_path):
    state = tiny().state_dict()
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    assert "blocks.1.mlp.fc2.weight" in _load_error(tmp_path / "missing.pt")

    wrong = dict(state)
    wrong["final_layer.linear.weight"] = torch.zeros(24, 16)
    torch.save(wrong, tmp_path / "wrong.pt")
    message = _load_error(tmp_path / "wrong.pt")
    assert "final_layer.linear.weight" in message and "(24, 16)" in message and "(24, 32)" in message

    extra = dict(state, **{"blocks.2.attn.qkv.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pt")
    assert "blocks.2.attn.qkv.weight" in _load_error(tmp_path / "extra.pt")

    assert "no such file" in _load_error(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    assert "cannot be read" in _load_error(tmp_path / "garbage.pt")

    # A checkpoint of another config (patch 4 instead of 2) names the first key that does not fit.
    torch.save(tiny(patch_size=4).state_dict(), tmp_path / "other.pt")
    assert "pos_embed" in _load_error(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- config checks

GEOMETRY = Geometry(input_size=32, in_channels=4, num_classes=1000)


def model_cfg(**kw):
    base = dict(name="x", size="x", depth=2, hidden_size=64, num_heads=4, patch_size=2,
                conditioning="adaln_zero", mlp_ratio=4.0, learn_sigma=True, class_dropout_prob=0.1)
    base.update(kw)
    return OmegaConf.create(base)


@pytest.mark.parametrize("kw, words", [
    (dict(conditioning="film"), ["model.conditioning", "'film'", "adaln_zero", "adaln", "cross_attention", "in_context"]),
    (dict(patch_size=3), ["model.patch_size=3", "32"]),
    (dict(hidden_size=66, num_heads=4), ["model.hidden_size=66", "model.num_heads=4"]),
    (dict(depth=0), ["model.depth", "positive"]),
    (dict(num_heads=-2), ["model.num_heads", "positive"]),
    (dict(hidden_size=0), ["model.hidden_size", "positive"]),
    (dict(patch_size=0), ["model.patch_size", "positive"]),
    (dict(class_dropout_prob=1.5), ["model.class_dropout_prob"]),
    (dict(hidden_size=6, num_heads=1), ["model.hidden_size=6", "multiple of 4"]),
])
def test_check_model_config_rejects(kw, words):
    with pytest.raises(HarnessError) as err:
        check_model_config(model_cfg(**kw), GEOMETRY)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_check_model_config_accepts_paper_and_custom_and_validate_uses_it():
    check_model_config(model_cfg(), GEOMETRY)
    cfg = compose(["model=custom", "model.patch_size=3"])
    with pytest.raises(HarnessError, match="patch_size=3"):
        validate(cfg)
    with pytest.raises(HarnessError, match="not one of"):
        validate(compose(["model.conditioning=nope"]))
