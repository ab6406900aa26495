"""The DiT model family (Peebles & Xie, "Scalable Diffusion Models with Transformers").

A latent (N, C, I, I) is cut into T = (I/p)^2 patches, embedded with a fixed 2D sin-cos positional
embedding, run through N transformer blocks conditioned on the timestep t and the class label y, and
mapped back to (N, 2C, I, I): C channels of predicted noise and, with learned sigma, C channels of
variance interpolation. Four ways of feeding (t, y) into the blocks are selectable by `conditioning`:

- `adaln_zero` (default): each block regresses shift, scale and a residual gate for both sub-layers
  from t_emb + y_emb; the regressions and the output projection start at zero, so every block starts
  as the identity. Its state_dict is the released DiT checkpoint format, key for key.
- `adaln`: shift and scale only, no gates, nothing zero-initialised.
- `cross_attention`: [t_emb, y_emb] is a length-2 sequence that each block attends to after
  self-attention.
- `in_context`: t_emb and y_emb are two extra tokens through plain ViT blocks, dropped at the end.

The public entry points are `build_model`, `check_model_config`, `load_weights` and `count_params`.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.config import CONDITIONINGS, Geometry, integer
from harness.errors import HarnessError, first_line, require


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm's affine step: x * (1 + scale) + shift, with per-sample (N, D) shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(hidden_size: int, affine: bool = False) -> nn.LayerNorm:
    """DiT's LayerNorm (eps 1e-6); without affine parameters where adaLN supplies scale and shift."""
    return nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=1e-6)


#################################################################################
#                  Embeddings: patches, positions, timesteps, labels            #
#################################################################################


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D): a Conv2d with kernel = stride = p, tokens in row-major patch order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The conv writes channel-major (N, D, T); left as a transposed view, every residual add after it
        # keeps that layout and each LayerNorm reduces over strided memory (on an H200, the fused
        # LayerNorm kernels of a DiT-XL/2 step ran split in two and uncoalesced). Token-major from here on.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """The fixed (T, D) positional embedding of a grid_size x grid_size patch grid (MAE / DiT layout).

    The first D/2 channels encode a token's column, the last D/2 its row; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)). Computed in float64 like the
    released models, so loading a released checkpoint changes nothing.
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): 256 sinusoidal frequencies -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[cos(t * f_k), sin(t * f_k)] with f_k = max_period^(-k / half); t may be fractional."""
        half = dim // 2
        # float32 frequencies, as in the released models (float64 would shift the last bits).
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D) from a table of num_classes + 1 rows; the last row is the null label.

    In training, labels are dropped to the null row with probability `dropout_prob` (classifier-free
    guidance). `force_drop_ids` (N,) drops exactly the entries equal to 1, in any mode.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # The null row exists even when dropout_prob is 0, so guided sampling always has a null label.
        # The table is filled by DiT.initialize_weights; from_pretrained skips nn.Embedding's own
        # N(0, 1) init, whose meta-device kernel alone costs seconds of imports in a meta build.
        self.embedding_table = nn.Embedding.from_pretrained(torch.empty(num_classes + 1, hidden_size), freeze=False)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                        Transformer layers: attention, MLP                     #
#################################################################################


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) v per head, for (N, L, D) q and (N, S, D) k, v -> (N, L, D)."""
    n, length, dim = q.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], num_heads, dim // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(n, length, dim)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias), laid out like timm's ViT."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # qkv output channels are ordered (3, heads, head_dim), which is what released weights expect.
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(multi_head_attention(q, k, v, self.num_heads))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to a short conditioning sequence."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=True)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self.proj(multi_head_attention(self.q(x), k, v, self.num_heads))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#                    Blocks: one per conditioning variant                       #
#################################################################################
# Every block is called as block(x, cond): cond is the (N, D) vector t_emb + y_emb for the adaLN
# blocks, the (N, 2, D) sequence [t_emb, y_emb] for cross-attention, and unused for in-context.


class AdaLNBlock(nn.Module):
    """A DiT block whose LayerNorms are modulated by shift/scale regressed from the conditioning.

    gated=True is adaLN-Zero: the regression also gives a gate per sub-layer, and its 6D outputs are
    chunked shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (the released order).
    gated=False is plain adaLN: 4D outputs shift_msa, scale_msa, shift_mlp, scale_mlp.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, gated: bool):
        super().__init__()
        self.gated = gated
        self.norm1 = layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if gated else 4) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttentionBlock(nn.Module):
    """Pre-norm self-attention, then cross-attention to [t_emb, y_emb], then the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, affine=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = layer_norm(hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class ViTBlock(nn.Module):
    """A standard pre-norm ViT block; the in-context variant's conditioning travels as tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """adaLN final layer: LayerNorm modulated by (shift, scale) = adaLN_modulation(c), then Linear to p*p*C_out."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainFinalLayer(nn.Module):
    """Final layer of the unmodulated variants (cross-attention, in-context): LayerNorm, then Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size, affine=True)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.norm_final(x))


#################################################################################
#                                   The DiT                                     #
#################################################################################


class DiT(nn.Module):
    """Diffusion model with a transformer backbone: forward(x, t, y) -> (N, out_channels, H, W)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        conditioning: str = "adaln_zero",
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise HarnessError(f"conditioning={conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.conditioning = conditioning
        self.grad_checkpointing = False  # recompute each block's activations in backward to save memory
        self.low_precision_residual = False  # keep the residual stream in autocast's dtype (see forward)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos values, stored as a frozen Parameter so the released checkpoints' key exists.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)

        if conditioning in ("adaln_zero", "adaln"):
            gated = conditioning == "adaln_zero"
            self.blocks = nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio, gated) for _ in range(depth))
            self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        elif conditioning == "cross_attention":
            self.blocks = nn.ModuleList(CrossAttentionBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
            self.final_layer = PlainFinalLayer(hidden_size, patch_size, self.out_channels)
        else:
            self.blocks = nn.ModuleList(ViTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
            self.final_layer = PlainFinalLayer(hidden_size, patch_size, self.out_channels)
        if not self.pos_embed.is_meta:  # a meta-device model has no values to initialise
            self.initialize_weights()

    def reset_pos_embed(self) -> None:
        """(Re)write the fixed sin-cos positional embedding."""
        grid = self.input_size // self.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The released DiT initialisation (xavier Linear/patch weights, N(0, 0.02) embeddings, zeroed adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.reset_pos_embed()
        # The patch conv is a Linear over flattened patches, so it is initialised like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "adaln_zero":
            # Zero regressions make every block the identity and the output zero at step 0.
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); each token's outputs are ordered (p, p, C)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], f"{x.shape[1]} tokens do not form a square grid"
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (n, h, w, p, q, c) -> (n, c, h, p, w, q)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels (num_classes = null label)."""
        x = self.x_embedder(x)  # (N, T, D)
        # Under autocast the patch conv returns bf16 and the fp32 pos_embed promotes the residual stream to
        # fp32 for every block. `low_precision_residual` (trainer.residual_precision=bf16) keeps it in the
        # conv's dtype instead, as Megatron-LM does by default: less memory traffic, a different rounding.
        x = x + (self.pos_embed.to(x.dtype) if self.low_precision_residual else self.pos_embed)
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        if self.conditioning in ("adaln_zero", "adaln"):
            cond = t_emb + y_emb
        elif self.conditioning == "cross_attention":
            cond = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
        else:
            cond = None
            x = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)  # (N, T + 2, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, use_reentrant=False)
            else:
                x = block(x, cond)
        x = x[:, : self.num_patches]  # in-context: drop the two conditioning tokens
        x = self.final_layer(x, cond)  # (N, T, p*p*out_channels)
        return self.unpatchify(x)


#################################################################################
#                    Building from a config, loading weights                    #
#################################################################################


def check_model_config(model_cfg, geometry: Geometry) -> None:
    """Raise HarnessError (one line naming the key) for a model config that cannot be built on `geometry`."""
    conditioning = model_cfg.get("conditioning", "adaln_zero")
    require(conditioning in CONDITIONINGS,
            f"model.conditioning={conditioning!r} is not one of {', '.join(CONDITIONINGS)}")
    depth, hidden, heads, patch = (integer(model_cfg, k, section="model") for k in ("depth", "hidden_size", "num_heads", "patch_size"))
    mlp_ratio = model_cfg.get("mlp_ratio", 4.0)
    require(isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0 and int(hidden * mlp_ratio) > 0,
            f"model.mlp_ratio must be positive, got {mlp_ratio!r}")
    dropout = model_cfg.get("class_dropout_prob", 0.1)
    require(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
            f"model.class_dropout_prob must be in [0, 1), got {dropout!r}")
    for key in ("input_size", "in_channels", "num_classes"):
        value = getattr(geometry, key)
        require(value > 0, f"latent {key} must be positive, got {value} (from the data/autoencoder config)")
    require(geometry.input_size % patch == 0,
            f"model.patch_size={patch} does not divide the latent size {geometry.input_size}; "
            f"allowed: a divisor of {geometry.input_size}")
    require(hidden % heads == 0,
            f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}")
    require(hidden % 4 == 0,
            f"model.hidden_size={hidden} must be a multiple of 4 (2D sin-cos positional embedding)")


def build_model(model_cfg, geometry: Geometry, *, device: str | torch.device = "cpu",
                init_weights: bool = True) -> DiT:
    """The DiT of `model_cfg` (the `model` config group) on `geometry`, checked first.

    Modules are created on the meta device and materialised once, so a DiT-XL/2 costs one
    initialisation, not two. device="meta" gives a weightless model (shapes, params, Gflops);
    init_weights=False leaves the weights uninitialised (only the fixed positional embedding is
    written), for models whose weights are loaded next or do not matter.
    """
    check_model_config(model_cfg, geometry)
    with torch.device("meta"):
        model = DiT(
            input_size=geometry.input_size,
            patch_size=model_cfg.patch_size,
            in_channels=geometry.in_channels,
            hidden_size=model_cfg.hidden_size,
            depth=model_cfg.depth,
            num_heads=model_cfg.num_heads,
            mlp_ratio=float(model_cfg.get("mlp_ratio", 4.0)),
            class_dropout_prob=float(model_cfg.get("class_dropout_prob", 0.1)),
            num_classes=geometry.num_classes,
            learn_sigma=bool(model_cfg.get("learn_sigma", True)),
            conditioning=model_cfg.get("conditioning", "adaln_zero"),
        )
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    if init_weights:
        model.initialize_weights()
    else:
        model.reset_pos_embed()
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters, the frozen positional embedding included (as the paper counts them)."""
    return sum(p.numel() for p in model.parameters())


def _read_checkpoint(path: str, which: str) -> object:
    if os.path.isdir(path):  # a training checkpoint directory (torch.distributed.checkpoint): only `which` is read
        from harness.run_dir import read_checkpoint

        try:
            return read_checkpoint(path, keys={which})
        except HarnessError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to read is one line for the user
            raise HarnessError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {first_line(err)})") from None
    require(os.path.isfile(path), f"checkpoint {path}: no such file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Our training checkpoints hold RNG states (NumPy arrays) that the weights-only unpickler
            # refuses; the user named this file, so it is trusted like any code they run.
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to read is one line for the user
        raise HarnessError(f"checkpoint {path}: cannot be read ({type(err).__name__}: {first_line(err)})") from None


def _strip_prefixes(state: Mapping[str, object]) -> dict:
    """Drop the wrappers' key prefixes (DDP `module.`, torch.compile `_orig_mod.`) if every key has one."""
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(path: str | os.PathLike, model: DiT, which: str = "ema") -> None:
    """Load a released DiT .pt (a plain state_dict) or one of our checkpoints, a directory or an older run's .pt
    (its `which` = "ema" | "model").

    Loading is strict: a missing, unexpected or differently shaped key raises one HarnessError line
    naming the file and the first offending key with the expected and found shapes.
    """
    path = os.fspath(path)
    require(which in ("ema", "model"), f"which={which!r} is not one of ema, model")
    obj = _read_checkpoint(path, which)
    require(isinstance(obj, Mapping), f"checkpoint {path}: holds a {type(obj).__name__}, not a state_dict")
    if "model" in obj or "ema" in obj:
        require(which in obj, f"checkpoint {path}: has no {which!r} weights (found keys: {', '.join(map(str, obj))})")
        obj = obj[which]
        require(isinstance(obj, Mapping), f"checkpoint {path}: {which!r} is not a state_dict")
    state = _strip_prefixes(obj)

    expected = model.state_dict()
    for key, ref in expected.items():
        require(key in state, f"checkpoint {path}: missing key {key!r} (expected shape {tuple(ref.shape)})")
        found = state[key]
        require(isinstance(found, torch.Tensor), f"checkpoint {path}: key {key!r} is not a tensor")
        require(found.shape == ref.shape,
                f"checkpoint {path}: key {key!r} has shape {tuple(found.shape)}, expected {tuple(ref.shape)}")
    for key, value in state.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        require(key in expected, f"checkpoint {path}: unexpected key {key!r} (shape {shape}) not in this model "
                                 f"(conditioning={model.conditioning})")
    meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=meta)
