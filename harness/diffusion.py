"""Gaussian diffusion as DiT uses it (Improved DDPM / ADM conventions).

One class, `GaussianDiffusion`, holds a discrete forward process (a beta schedule, optionally
respaced to a subset of its timesteps) and everything DiT needs from it:

- forward noising `q_sample` and the true posterior `q_posterior_mean_variance`;
- the model's reverse Gaussian `p_mean_variance` from an eps prediction and, when sigma is learned,
  a variance interpolation channel v in [-1, 1] (log-variance between log beta_t and the clipped
  log posterior variance with weight (v + 1) / 2);
- the hybrid training loss `training_losses` (L_simple on eps + the variational bound for the
  variance, the bound seeing a detached mean);
- `sample`: ancestral DDPM with the learned variance, or DDIM with eta, on a respaced process,
  with classifier-free guidance computed as one doubled batch.

The model is any callable `model(x, t, y) -> (N, 2C or C, H, W)` (DiT's signature). It is always
called with the ORIGINAL timestep indices (0 .. T-1), also on a respaced process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.errors import HarnessError, require

DEFAULT_NUM_TIMESTEPS = 1000
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02
SAMPLER_KINDS = ("ddpm", "ddim")
# The coefficients of one reverse step p(x_{t-1} | x_t), as `_reverse_gaussian` reads them.
REVERSE_COEFS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                 "posterior_mean_coef2", "log_betas", "posterior_log_variance_clipped", "fixed_log_variance")


# --------------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = DEFAULT_NUM_TIMESTEPS, beta_start: float = DEFAULT_BETA_START,
                 beta_end: float = DEFAULT_BETA_END) -> np.ndarray:
    """The linear beta schedule of DDPM, as float64."""
    require(int(num_timesteps) > 0, f"diffusion.num_timesteps must be positive, got {num_timesteps}")
    require(
        0.0 < float(beta_start) <= float(beta_end) < 1.0,
        f"diffusion.beta_start={beta_start} and beta_end={beta_end} must satisfy 0 < beta_start <= beta_end < 1",
    )
    return np.linspace(float(beta_start), float(beta_end), int(num_timesteps), dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """The sorted original timesteps kept by a respacing spec (ADM's `space_timesteps` semantics).

    - "ddimN": the fixed stride of the DDIM paper, `range(0, T, stride)` with exactly N elements.
    - "N" or "a,b,c": T is cut into len(sections) equal parts (the first T % len parts one step
      longer); part i keeps section_counts[i] steps evenly spread over it, rounded, both ends
      included. "250" with T = 1000 keeps 0, 4, 8, ..., 999.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        text = section_counts[len("ddim"):]
        require(text.isdigit(), f"timestep respacing {section_counts!r}: expected ddim<N>")
        stride = _ddim_stride(num_timesteps, int(text))
        require(stride is not None, f"timestep respacing {section_counts!r}: no integer stride gives exactly "
                                    f"{int(text)} of {num_timesteps} steps")
        return list(range(0, num_timesteps, stride))
    counts = _section_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        require(
            1 <= count <= size,
            f"timestep respacing {section_counts!r}: section {i} keeps {count} steps, allowed 1..{size}",
        )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated, not j * stride, so rounding matches ADM step for step
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _ddim_stride(num_timesteps: int, steps: int) -> int | None:
    """The integer stride s with len(range(0, T, s)) == steps, if there is one (the DDIM paper's spacing)."""
    return next((s for s in range(1, num_timesteps + 1) if len(range(0, num_timesteps, s)) == steps), None)


def _section_counts(spec: str | int | list[int]) -> list[int]:
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        parts = spec.split(",")
        require(
            all(p.strip().isdigit() for p in parts),
            f"timestep respacing {spec!r}: expected an integer or comma-separated integers",
        )
        return [int(p) for p in parts]
    return [int(c) for c in spec]


def parse_sampler(spec: str, num_timesteps: int = DEFAULT_NUM_TIMESTEPS, key: str = "sampler") -> tuple[str, str]:
    """Split a sampler spec into (kind, respacing): "ddpm250" -> ("ddpm", "250"), "250" -> ("ddpm", "250"),
    "ddim50" -> ("ddim", "ddim50"); "ddpm10,15,20" gives ADM section counts.

    For DDIM the stride spacing of the DDIM paper is used when an integer stride gives exactly N steps,
    otherwise the evenly spread "N" spacing (ADM would refuse such an N). Errors name the spec as `key`.
    """
    text = str(spec).strip().lower()
    allowed = f"allowed: ddpm<N> | ddim<N> | <N> with 1 <= N <= {num_timesteps} (or comma-separated section counts)"
    kind, steps = re.fullmatch(r"([a-z_]*)(.*)", text).groups()
    kind = kind or "ddpm"
    if kind not in SAMPLER_KINDS:
        raise HarnessError(f"{key}={spec!r}: unknown sampler {kind!r}; {allowed}")
    if not steps:
        raise HarnessError(f"{key}={spec!r}: no number of steps; {allowed}")
    parts = steps.split(",")
    if not all(p.isdigit() for p in parts):
        raise HarnessError(f"{key}={spec!r}: the number of steps is not an integer; {allowed}")
    counts = [int(p) for p in parts]
    total = sum(counts)
    if min(counts) < 1 or total > num_timesteps:
        raise HarnessError(f"{key}={spec!r}: {total} steps is out of range; {allowed}")
    respacing = ",".join(str(c) for c in counts)
    if kind == "ddim" and len(counts) == 1 and _ddim_stride(num_timesteps, total) is not None:
        respacing = f"ddim{total}"
    try:
        space_timesteps(num_timesteps, respacing)
    except HarnessError as err:
        raise HarnessError(f"{key}={spec!r}: {err}") from None
    return kind, respacing


# --------------------------------------------------------------------------------------------
# Gaussian helpers (nats unless the name says bits)
# --------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that ADM's decoder likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of x, taken as 8-bit values rescaled to [-1, 1], under a Gaussian
    integrated over each value's bin of width 2/255; the two edge bins extend to +-infinity."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Noise is drawn on the generator's own device, so a CPU generator gives the same noise for any
    # sampling device.
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


# --------------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion process over `betas`, optionally respaced.

    `timestep_respacing` (None / "" = all steps, "250", "ddim50", "10,15,20") keeps a subset of the
    original timesteps; the respaced process keeps alphas_cumprod at the kept steps and derives its
    own betas from them. Arrays are float64 numpy; their torch copies are cached per device.
    `learn_sigma`: None infers it from the model's output channels (2C: learned, C: fixed);
    True/False additionally checks the model agrees. Without a learned sigma the variance is DiT's
    fixed "large" choice, beta_t (posterior variance at t = 0).
    """

    def __init__(self, betas, timestep_respacing: str | int | list[int] | None = None, learn_sigma: bool | None = None):
        self.base_betas = np.asarray(betas, dtype=np.float64)
        require(self.base_betas.ndim == 1 and len(self.base_betas) > 0, "diffusion betas must be a non-empty 1-D array")
        require(
            bool(np.all((self.base_betas > 0) & (self.base_betas < 1))),
            "diffusion betas must lie in (0, 1)",
        )
        self.base_num_timesteps = len(self.base_betas)
        self.learn_sigma = learn_sigma
        base_alphas_cumprod = np.cumprod(1.0 - self.base_betas)
        if timestep_respacing in (None, ""):
            kept = list(range(self.base_num_timesteps))
        else:
            kept = space_timesteps(self.base_num_timesteps, timestep_respacing)
        self.timestep_map = np.asarray(kept, dtype=np.int64)

        # Respacing keeps abar at the kept steps; beta_k = 1 - abar_k / abar_{k-1} makes that exact.
        alphas_cumprod = base_alphas_cumprod[self.timestep_map]
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.betas = 1.0 - alphas_cumprod / self.alphas_cumprod_prev
        self.num_timesteps = len(self.betas)

        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0). The posterior variance is 0 at t = 0, so its log is clipped to the
        # value at t = 1 (ADM); the learned-range interpolation uses this clipped log.
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(self.betas)
        self.fixed_log_variance = np.log(np.append(first, self.betas[1:]))

        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._respaced: dict[str, GaussianDiffusion] = {}

    # ---- coefficient lookup ------------------------------------------------------------------

    def _buffer(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = torch.from_numpy(getattr(self, name)).to(device)
        return self._device_cache[key]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Coefficient `name` at timesteps t (N,), as float32 shaped (N, 1, 1, ...) to broadcast against `like`."""
        values = self._buffer(name, t.device)[t].float()
        return values.view(-1, *([1] * (like.ndim - 1)))

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> dict:
        return {name: self._extract(name, t, like) for name in REVERSE_COEFS}

    def _step_coefs(self, i: int) -> dict:
        # The same coefficients as _coefs (and DDIM's two) for one step of the sampling loop, as Python
        # floats: a scalar broadcast costs no gather kernel and no host-device traffic.
        return {name: float(getattr(self, name)[i]) for name in (*REVERSE_COEFS, "alphas_cumprod", "alphas_cumprod_prev")}

    # ---- forward process ---------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._extract("sqrt_alphas_cumprod", t, x0) * x0 + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- reverse process ---------------------------------------------------------------------

    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor):
        """(eps, v or None) from a model output; checks the channel count against x and learn_sigma."""
        channels = x.shape[1]
        learned = model_output.shape[1] == 2 * channels
        if not learned and model_output.shape[1] != channels:
            raise HarnessError(
                f"model output has {model_output.shape[1]} channels; expected {channels} (eps) or {2 * channels} (eps and v)"
            )
        if self.learn_sigma is not None and bool(self.learn_sigma) != learned:
            raise HarnessError(
                f"model output has {model_output.shape[1]} channels but the diffusion was built with learn_sigma={self.learn_sigma}"
            )
        model_output = model_output.float()
        if learned:
            eps, v = model_output.split(channels, dim=1)
            return eps, v
        return model_output, None

    @staticmethod
    def _predict_x0(eps, x_t, c: dict, clip_denoised: bool):
        """x_0 from x_t and the predicted noise, clipped to the data range if asked."""
        x0 = c["sqrt_recip_alphas_cumprod"] * x_t - c["sqrt_recipm1_alphas_cumprod"] * eps
        return x0.clamp(-1.0, 1.0) if clip_denoised else x0

    @staticmethod
    def _reverse_gaussian(eps, v, x_t, c: dict, clip_denoised: bool):
        """Mean, log-variance and x_0 prediction of p(x_{t-1} | x_t); `c` holds this step's coefficients
        as broadcastable tensors or Python floats, so training and the sampling loop share this code."""
        x0 = GaussianDiffusion._predict_x0(eps, x_t, c, clip_denoised)
        mean = c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * x_t
        if v is None:
            log_variance = c["fixed_log_variance"]
        else:
            frac = (v + 1.0) / 2.0  # v in [-1, 1]: -1 = posterior variance, +1 = beta_t
            log_variance = frac * c["log_betas"] + (1.0 - frac) * c["posterior_log_variance_clipped"]
        return mean, log_variance, x0

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False) -> dict:
        """The model's Gaussian p(x_{t-1} | x_t) from its raw output at timesteps t of this process.

        Returns {"mean", "variance", "log_variance", "pred_x0", "eps"}, each shaped like x_t.
        `clip_denoised` clamps the x_0 prediction to [-1, 1] (pixels); leave it off for latents.
        """
        eps, v = self._split_output(model_output, x_t)
        mean, log_variance, x0 = self._reverse_gaussian(eps, v, x_t, self._coefs(t, x_t), clip_denoised)
        log_variance = log_variance.expand_as(x_t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_x0": x0, "eps": eps}

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timestep indices the model sees for timesteps t of this (possibly respaced) process."""
        return self._buffer("timestep_map", t.device)[t]

    # ---- training ----------------------------------------------------------------------------

    def vb_terms_bpd(self, eps: torch.Tensor, v: torch.Tensor | None, x0: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """Per-sample variational-bound term in bits/dim of the model's (eps, v) at x_t:
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretized Gaussian decoder NLL of x_0 at t = 0."""
        c = self._coefs(t, x_t)
        mean, log_variance, _ = self._reverse_gaussian(eps, v, x_t, c, clip_denoised=False)
        true_mean = c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * x_t
        kl = mean_flat(normal_kl(true_mean, c["posterior_log_variance_clipped"], mean, log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_variance)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict:
        """DiT's hybrid loss per sample: {"loss": mse + vb, "mse": mean-over-dims (eps - eps_pred)^2, "vb"}.

        `model(x_t, t_original, **model_kwargs)`. With a learned sigma, vb is the variational bound
        (bits/dim, not rescaled) of the Gaussian whose mean comes from the DETACHED eps prediction, so
        vb trains only the variance channels; without it vb is zero and loss = mse.
        """
        x0 = x0.float()
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self._split_output(model_output, x0)
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            vb = self.vb_terms_bpd(eps.detach(), v, x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ---- sampling ----------------------------------------------------------------------------

    def respaced(self, respacing: str | int | list[int] | None) -> "GaussianDiffusion":
        """This schedule respaced (from the ORIGINAL betas); cached, so a sampling loop reuses it."""
        key = "" if respacing in (None, "") else str(respacing)
        if key not in self._respaced:
            self._respaced[key] = GaussianDiffusion(self.base_betas, key or None, learn_sigma=self.learn_sigma)
        return self._respaced[key]

    def guided_output(self, model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float = 1.0,
                      cfg_channels: int | None = None, null_label: int | None = None) -> torch.Tensor:
        """The model output used for sampling, with classifier-free guidance.

        `t` holds original timestep indices. At scale 1 this is exactly `model(x, t, y)` (one call, batch N).
        Otherwise one call on the doubled batch [x, x] with labels [y, null]; the first `cfg_channels`
        eps channels (all C if None) become eps_null + s * (eps_y - eps_null), and every other channel
        (the rest of eps, and the variance channels) is the conditional half's, as in the released
        DiT sampler (whose cfg_channels is 3).
        """
        if cfg_scale == 1.0:
            return model(x, t, y)
        if null_label is None:
            null_label = _model_attr(model, "num_classes")
            require(null_label is not None, "classifier-free guidance needs null_label or a model with num_classes")
        channels = x.shape[1]
        k = channels if cfg_channels is None else int(cfg_channels)
        require(1 <= k <= channels, f"cfg_channels={cfg_channels} must be between 1 and {channels} (or null for all)")
        n = x.shape[0]
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, int(null_label))]))
        cond, uncond = out[:n], out[n:]
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    @torch.no_grad()
    def sample(self, model, shape, y, sampler: str | None = "ddpm250", cfg_scale: float = 1.0,
               cfg_channels: int | None = None, null_label: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, device=None, progress: bool = False,
               clip_denoised: bool = False) -> torch.Tensor:
        """Draw x_0 samples of `shape` (N, C, H, W) for labels y (N,) with `sampler` ("ddpm250",
        "ddim50", "250"; None: ancestral DDPM over this process as it is).

        All noise comes from `generator` (drawn on its device), so the same seed gives the same
        samples. DDPM uses the model's learned variance (or the fixed one) and adds no noise at the
        last step; DDIM uses `eta`. See `guided_output` for classifier-free guidance.
        """
        if sampler is None:
            kind, process = "ddpm", self
        else:
            kind, respacing = parse_sampler(sampler, self.base_num_timesteps)
            process = self.respaced(respacing)
        if device is None:
            device = y.device if isinstance(y, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        y = torch.as_tensor(y, dtype=torch.long, device=device)
        n = shape[0]
        require(y.shape == (n,), f"sample: y must have shape ({n},), got {tuple(y.shape)}")

        # Everything per step is prepared once: the model's timestep tensors and the scalar coefficients.
        model_t = [torch.full((n,), int(s), dtype=torch.long, device=device) for s in process.timestep_map]
        coefs = [process._step_coefs(i) for i in range(process.num_timesteps)]
        steps = range(process.num_timesteps - 1, -1, -1)
        if progress:
            steps = tqdm(steps, desc=f"sampling {sampler}")

        x = _randn(shape, generator, device)
        for i in steps:
            out = process.guided_output(model, x, model_t[i], y, cfg_scale, cfg_channels, null_label)
            eps, v = process._split_output(out, x)
            c = coefs[i]
            if kind == "ddpm":
                mean, log_variance, _ = process._reverse_gaussian(eps, v, x, c, clip_denoised)
                if i == 0:
                    x = mean
                else:
                    std = math.exp(0.5 * log_variance) if v is None else torch.exp(0.5 * log_variance)
                    x = mean + std * _randn(shape, generator, device)
            else:
                x = process._ddim_step(eps, x, c, eta, clip_denoised, generator, device, last=(i == 0))
        return x

    @staticmethod
    def _ddim_step(eps, x, c: dict, eta: float, clip_denoised: bool, generator, device, last: bool) -> torch.Tensor:
        """One DDIM update (Song et al. 2021, eq. 12) with sigma scaled by eta; the learned variance is unused."""
        x0 = GaussianDiffusion._predict_x0(eps, x, c, clip_denoised)
        if clip_denoised:  # the noise that the clipped x_0 implies
            eps = (c["sqrt_recip_alphas_cumprod"] * x - x0) / c["sqrt_recipm1_alphas_cumprod"]
        abar, abar_prev = c["alphas_cumprod"], c["alphas_cumprod_prev"]
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar)) * math.sqrt(1.0 - abar / abar_prev)
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        if last or sigma == 0.0:
            return x_prev
        return x_prev + sigma * _randn(x.shape, generator, device)


def _model_attr(model, name: str):
    """An attribute of a model that may be wrapped by DDP (.module) or torch.compile (._orig_mod)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if candidate is not None and hasattr(candidate, name):
            return getattr(candidate, name)
    return None


def create_diffusion(diffusion_cfg: Mapping | None = None, respacing: str | int | None = None,
                     learn_sigma: bool | None = None) -> GaussianDiffusion:
    """The diffusion of a config's `diffusion:` group (num_timesteps, beta_start, beta_end; missing keys
    take DiT's defaults 1000, 1e-4, 0.02), respaced by `respacing` (None = all steps)."""
    cfg = dict(diffusion_cfg or {})
    betas = linear_betas(
        int(cfg.get("num_timesteps", DEFAULT_NUM_TIMESTEPS)),
        float(cfg.get("beta_start", DEFAULT_BETA_START)),
        float(cfg.get("beta_end", DEFAULT_BETA_END)),
    )
    return GaussianDiffusion(betas, timestep_respacing=respacing, learn_sigma=learn_sigma)

