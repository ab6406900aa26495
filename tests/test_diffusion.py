"""Tests of harness.diffusion with analytic models (no DiT): schedules, respacing, posterior,
exact-score sampling of a Gaussian, classifier-free guidance, the hybrid loss, seeding."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    linear_betas,
    parse_sampler,
    space_timesteps,
)
from harness.errors import HarnessError

T = 1000
# The schedule written out independently of the module: DDPM's linear betas and their products.
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion({"num_timesteps": T, "beta_start": 1e-4, "beta_end": 0.02})


# ------------------------------------------------------------------------------------------------
# Schedule, forward process, posterior, respacing, sampler specs
# ------------------------------------------------------------------------------------------------


def test_schedule_matches_ddpm_linear(diffusion):
    np.testing.assert_allclose(diffusion.betas, BETAS, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod, ABAR, rtol=1e-12)
    assert diffusion.betas.dtype == np.float64 and diffusion.num_timesteps == T
    cfg = OmegaConf.create({"num_timesteps": 50, "beta_start": 0.001, "beta_end": 0.05})
    assert create_diffusion(cfg).num_timesteps == 50
    with pytest.raises(HarnessError, match="beta_start"):
        create_diffusion({"num_timesteps": 10, "beta_start": 0.5, "beta_end": 0.1})
    with pytest.raises(HarnessError, match="num_timesteps"):
        create_diffusion({"num_timesteps": 0})


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_moments(diffusion, t):
    # 400k independent elements: the standard error of the mean is < 1.6e-3 and of the variance
    # < 2.3e-3, so 6e-3 is ~4 standard errors.
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((100_000, 4), 0.7)
    noise = torch.randn(x0.shape, generator=g)
    xt = diffusion.q_sample(x0, torch.full((x0.shape[0],), t), noise)
    assert xt.mean().item() == pytest.approx(math.sqrt(ABAR[t]) * 0.7, abs=6e-3)
    assert xt.var().item() == pytest.approx(1.0 - ABAR[t], abs=6e-3)


def test_posterior_matches_bayes_rule(diffusion):
    # q(x_{t-1}|x_t,x_0) from Gaussian conditioning: prior N(sqrt(abar_{t-1}) x0, 1-abar_{t-1}),
    # likelihood N(x_t; sqrt(alpha_t) x_{t-1}, beta_t).
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 2, 10, 300, 999])
    x0 = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        prior_mean, prior_var = math.sqrt(ABAR[ti - 1]) * x0[i], 1.0 - ABAR[ti - 1]
        alpha, beta = 1.0 - BETAS[ti], BETAS[ti]
        post_var = 1.0 / (1.0 / prior_var + alpha / beta)
        post_mean = post_var * (prior_mean / prior_var + math.sqrt(alpha) * xt[i] / beta)
        torch.testing.assert_close(mean[i].double(), post_mean, rtol=1e-5, atol=1e-5)
        assert var[i].flatten()[0].item() == pytest.approx(post_var, rel=1e-5)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(post_var), rel=1e-5)
    # At t = 0 the posterior is a point mass: mean x0, log-variance clipped to the value at t = 1.
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(mean0.double(), x0[:1], rtol=1e-6, atol=1e-6)
    assert var0.abs().max().item() == 0.0
    assert log_var0.flatten()[0].item() == pytest.approx(math.log(BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])), rel=1e-5)


@pytest.mark.parametrize("base,spec,count", [(1000, "250", 250), (1000, "ddim50", 50), (300, "10,15,20", 45), (1000, "1000", 1000)])
def test_respacing_keeps_alphas_cumprod(base, spec, count):
    betas = linear_betas(base)
    process = GaussianDiffusion(betas, timestep_respacing=spec)
    full = np.cumprod(1.0 - betas)
    assert process.num_timesteps == count == len(process.timestep_map)
    np.testing.assert_allclose(process.alphas_cumprod, full[process.timestep_map], rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1.0 - process.betas), process.alphas_cumprod, rtol=1e-10)
    assert process.timestep_map[0] == 0 and np.all(np.diff(process.timestep_map) > 0)


def test_space_timesteps_semantics():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert kept[:3] == [0, 4, 8] and kept[-1] == 999 and len(kept) == 250
    # ADM's example: 300 steps, sections [10, 15, 20] over thirds of 100 steps each.
    kept = space_timesteps(300, "10,15,20")
    assert kept[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert kept[10] == 100 and kept[-1] == 299 and len(kept) == 45
    with pytest.raises(HarnessError):
        space_timesteps(300, "200,15,20")


@pytest.mark.parametrize(
    "spec,expected",
    [("ddpm250", ("ddpm", "250")), ("250", ("ddpm", "250")), ("ddim50", ("ddim", "ddim50")),
     ("ddpm1000", ("ddpm", "1000")), ("ddpm1", ("ddpm", "1")), ("ddpm10,15,20", ("ddpm", "10,15,20")),
     ("ddim300", ("ddim", "300"))],
)
def test_parse_sampler_good(spec, expected):
    assert parse_sampler(spec, T) == expected


@pytest.mark.parametrize(
    "spec,why",
    [("euler50", "unknown sampler"), ("ddpm0", "out of range"), ("ddpm1001", "out of range"),
     ("ddim2000", "out of range"), ("ddpm2.5", "not an integer"), ("ddpmx", "unknown sampler"), ("ddpm1e3", "not an integer"),
     ("ddim", "no number of steps"), ("", "no number of steps")],
)
def test_parse_sampler_bad(spec, why):
    with pytest.raises(HarnessError) as err:
        parse_sampler(spec, T)
    message = str(err.value)
    assert "\n" not in message and repr(spec) in message and why in message and "ddpm<N>" in message


# ------------------------------------------------------------------------------------------------
# Exact-score sampling of a Gaussian data distribution
# ------------------------------------------------------------------------------------------------

MU = torch.tensor([0.5, -1.0])  # one mean per channel


class GaussianScoreModel:
    """The exact eps-predictor of data x0 ~ N(MU[c], s^2) elementwise: for x_t ~ N(sqrt(a) mu, a s^2 + 1 - a),
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a). Called with ORIGINAL timesteps.

    variance: None (C output channels, fixed variance), a number (the v channel), or "exact", the v
    that makes the reverse step the exact Gaussian conditional on the respaced process `kept`.
    """

    num_classes = 10

    def __init__(self, s, variance=None, kept=None):
        self.s, self.variance, self.calls = s, variance, []
        self.prev = dict(zip(kept[1:], kept[:-1])) if kept is not None else {}
        self.learn_sigma = variance is not None

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        a = torch.from_numpy(ABAR).float()[t].view(-1, 1, 1, 1)
        mu = MU.view(1, -1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.s**2 + 1 - a)
        if self.variance is None:
            return eps
        if self.variance == "exact":
            assert bool((t == t[0]).all())  # the sampler steps the whole batch together
            v = torch.full_like(x, self._exact_v(int(t[0])))
        else:
            v = torch.full_like(x, float(self.variance))
        return torch.cat([eps, v], dim=1)

    def _exact_v(self, t):
        if t == 0:  # the last step adds no noise; any v in [-1, 1] will do
            return 0.0
        a, ap = ABAR[t], ABAR[self.prev[t]]
        beta = 1 - a / ap
        post_var = beta * (1 - ap) / (1 - a)
        coef1 = beta * math.sqrt(ap) / (1 - a)
        var_x0 = self.s**2 * (1 - a) / (a * self.s**2 + 1 - a)
        frac = (math.log(post_var + coef1**2 * var_x0) - math.log(post_var)) / (math.log(beta) - math.log(post_var))
        assert 0.0 <= frac <= 1.0
        return 2 * frac - 1


SHAPE = (4096, 2, 4, 4)  # 65,536 iid elements per channel


def _check_moments(x, mean, var):
    # Per channel n iid elements: the standard error of the mean is sqrt(var / n), of the sample
    # variance var * sqrt(2 / n); the tolerances are 5 standard errors (0.02 and 0.028 at var 1).
    for c in range(2):
        values = x[:, c].flatten()
        n = values.numel()
        assert values.mean().item() == pytest.approx(float(mean[c]), abs=5 * math.sqrt(var[c] / n)), f"channel {c} mean"
        assert values.var().item() == pytest.approx(float(var[c]), abs=5 * var[c] * math.sqrt(2 / n)), f"channel {c} variance"


@pytest.mark.parametrize("sampler,learned", [("ddpm50", True), ("ddpm50", False), ("ddpm250", True)])
def test_ddpm_reproduces_gaussian_with_beta_variance(diffusion, sampler, learned):
    # For data variance 1 the exact reverse variance is beta_t (Ho et al. 2020, Sec. 3.2), whatever
    # the mean: v = +1 with a learned sigma, and DiT's fixed "large" variance without one.
    model = GaussianScoreModel(1.0, variance=1.0 if learned else None)
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    x = diffusion.sample(model, SHAPE, y, sampler=sampler, generator=torch.Generator().manual_seed(1))
    _check_moments(x, MU, [1.0, 1.0])


def test_ddpm_learned_variance_interpolation(diffusion):
    # Data std 0.5: the exact reverse variance lies strictly between the posterior variance and beta_t;
    # the model emits the v that gives it, so samples are exact only if the log-variance interpolation is.
    kept = space_timesteps(T, "50")
    model = GaussianScoreModel(0.5, variance="exact", kept=kept)
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    x = diffusion.sample(model, SHAPE, y, sampler="ddpm50", generator=torch.Generator().manual_seed(2))
    _check_moments(x, MU, [0.25, 0.25])
    # The extremes v = -1 / +1 give too small / too large a variance, by more than 5 standard errors
    # (0.007): the check above can fail.
    for v, direction in ((-1.0, -1), (1.0, 1)):
        x = diffusion.sample(GaussianScoreModel(0.5, variance=v), SHAPE, y, sampler="ddpm50",
                             generator=torch.Generator().manual_seed(3))
        assert direction * (x[:, 0].var().item() - 0.25) > 5 * 0.25 * math.sqrt(2 / x[:, 0].numel())


def _ddim_expected(s, kept, eta):
    """Mean offset factor and variance of DDIM with the exact eps on N(mu, s^2): each step is linear in
    d = x - sqrt(abar) mu, d_prev = c d + sigma z, so the moments follow in closed form."""
    scale, var = 1.0, 1.0  # x_T ~ N(0, 1): d_T has mean -sqrt(abar_T) mu, variance 1
    for k in range(len(kept) - 1, -1, -1):
        a, ap = ABAR[kept[k]], (ABAR[kept[k - 1]] if k > 0 else 1.0)
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        c = (math.sqrt(ap) * s**2 * math.sqrt(a) + math.sqrt(1 - ap - sigma**2) * math.sqrt(1 - a)) / (a * s**2 + 1 - a)
        scale, var = scale * c, c**2 * var + (sigma**2 if k > 0 else 0.0)
    return scale, var


@pytest.mark.parametrize("sampler,eta", [("ddim50", 0.0), ("ddim50", 1.0), ("ddim250", 0.0)])
def test_ddim_reproduces_gaussian(diffusion, sampler, eta):
    kept = space_timesteps(T, sampler)
    scale, var = _ddim_expected(1.0, kept, eta)
    mean = MU * (1 - scale * math.sqrt(ABAR[-1]))
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    x = diffusion.sample(GaussianScoreModel(1.0, variance=0.3), SHAPE, y, sampler=sampler, eta=eta,
                         generator=torch.Generator().manual_seed(4))
    _check_moments(x, mean, [var, var])  # the discretised process, exactly
    if eta == 0.0:
        # Deterministic DDIM is the data distribution up to its step size: within 8% at 50 steps,
        # and at 250 steps within the sampling tolerance of the data moments themselves.
        assert var == pytest.approx(1.0, abs=0.08)
        if sampler == "ddim250":
            _check_moments(x, MU, [1.0, 1.0])


def test_model_sees_original_timesteps(diffusion):
    model = GaussianScoreModel(1.0, variance=0.0)
    diffusion.sample(model, (3, 2, 2, 2), torch.zeros(3, dtype=torch.long), sampler="ddpm10",
                     generator=torch.Generator().manual_seed(0))
    seen = [int(t[0]) for _, t, _ in model.calls]
    assert seen == space_timesteps(T, "10")[::-1]
    assert all(t.dtype == torch.long and t.shape == (3,) for _, t, _ in model.calls)


def test_ddpm_adds_no_noise_at_the_last_step(diffusion, monkeypatch):
    """x_T, then one draw per step but the last, which returns the posterior mean."""
    import harness.diffusion as module

    draws, randn = [], module._randn
    monkeypatch.setattr(module, "_randn", lambda *a, **k: draws.append(1) or randn(*a, **k))
    diffusion.sample(GaussianScoreModel(1.0, variance=0.0), (3, 2, 2, 2), torch.zeros(3, dtype=torch.long),
                     sampler="ddpm10", generator=torch.Generator().manual_seed(0))
    assert len(draws) == 1 + 9


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ------------------------------------------------------------------------------------------------


class LabelModel:
    """Output depends on the label so conditional and unconditional halves differ; records calls."""

    num_classes = 7
    learn_sigma = True

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        c = x.shape[1]
        label = (y.float() + 1).view(-1, 1, 1, 1)
        channel = torch.arange(1, 2 * c + 1, dtype=torch.float32).view(1, -1, 1, 1)
        return 0.1 * torch.cat([x, x], dim=1) + torch.sin(label * channel) + 1e-3 * t.float().view(-1, 1, 1, 1)


def test_cfg_scale_one_is_the_conditional_prediction(diffusion):
    model = LabelModel()
    x, t, y = torch.randn(5, 4, 2, 2), torch.full((5,), 37), torch.arange(5)
    out = diffusion.guided_output(model, x, t, y, cfg_scale=1.0)
    assert len(model.calls) == 1 and model.calls[0][0] == 5
    torch.testing.assert_close(out, LabelModel()(x, t, y))
    model.calls.clear()
    diffusion.sample(model, (5, 4, 2, 2), y, sampler="ddpm8", cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in model.calls] == [5] * 8


@pytest.mark.parametrize("k", [None, 3, 1])
def test_cfg_guidance_formula_and_doubled_batch(diffusion, k):
    model, s = LabelModel(), 4.0
    x, t, y = torch.randn(5, 4, 2, 2), torch.full((5,), 500), torch.arange(5)
    out = diffusion.guided_output(model, x, t, y, cfg_scale=s, cfg_channels=k)
    assert len(model.calls) == 1 and model.calls[0][0] == 10
    assert model.calls[0][1].tolist() == list(range(5)) + [7] * 5  # null label = num_classes
    reference = LabelModel()
    cond, uncond = reference(x, t, y), reference(x, t, torch.full_like(y, 7))
    k_eff = 4 if k is None else k
    torch.testing.assert_close(out[:, :k_eff], uncond[:, :k_eff] + s * (cond[:, :k_eff] - uncond[:, :k_eff]))
    torch.testing.assert_close(out[:, k_eff:], cond[:, k_eff:])  # rest of eps and the v channels: conditional
    assert not torch.allclose(out[:, :k_eff], cond[:, :k_eff])
    model.calls.clear()
    diffusion.sample(model, (5, 4, 2, 2), y, sampler="ddim6", cfg_scale=s, cfg_channels=k,
                     generator=torch.Generator().manual_seed(0))
    assert [n for n, _ in model.calls] == [10] * 6


def test_cfg_bad_channels(diffusion):
    with pytest.raises(HarnessError, match="cfg_channels"):
        diffusion.guided_output(LabelModel(), torch.randn(2, 4, 2, 2), torch.zeros(2, dtype=torch.long),
                                torch.zeros(2, dtype=torch.long), cfg_scale=2.0, cfg_channels=5)


# ------------------------------------------------------------------------------------------------
# Hybrid training loss
# ------------------------------------------------------------------------------------------------


class SplitModel(torch.nn.Module):
    """eps = a * x and v = tanh(b * x): separate parameters for the mean and the variance channels."""

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(0.05))
        self.learn_sigma, self.num_classes = learn_sigma, 10

    def forward(self, x, t, y=None):
        eps = self.a * x
        return torch.cat([eps, torch.tanh(self.b * x)], dim=1) if self.learn_sigma else eps


def test_training_losses_hybrid(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 4, 4, 4, generator=g) * 2 - 1
    t = torch.cat([torch.tensor([0, 1, 999]), torch.randint(0, diffusion.num_timesteps, (13,), generator=g)])
    model = SplitModel()
    losses = diffusion.training_losses(model, x0, t, model_kwargs={"y": torch.zeros(16, dtype=torch.long)})
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (16,) for v in losses.values())
    assert torch.isfinite(losses["vb"]).all() and (losses["vb"] >= 0).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # The bound sees a detached mean: its gradient reaches the variance parameter only.
    grad_a, grad_b = torch.autograd.grad(losses["vb"].sum(), [model.a, model.b], allow_unused=True, retain_graph=True)
    assert (grad_a is None or grad_a.abs().item() == 0.0) and grad_b.abs().item() > 0
    grad_a_mse, = torch.autograd.grad(losses["mse"].sum(), [model.a])
    assert grad_a_mse.abs().item() > 0

    fixed = diffusion.training_losses(SplitModel(learn_sigma=False), x0, t)
    assert (fixed["vb"] == 0).all()
    torch.testing.assert_close(fixed["loss"], fixed["mse"])


def test_vb_closed_form(diffusion):
    # With the true noise as eps prediction the model mean is the true posterior mean, so the KL
    # is 0 at v = -1 (posterior variance) and 0.5 * (r - 1 - log r) / ln 2 at v = +1, r = post_var / beta.
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 10, 200, 999])
    for v in (-1.0, 1.0):
        model = lambda x, tt: torch.cat([noise, torch.full_like(x, v)], dim=1)  # noqa: E731
        vb = diffusion.training_losses(model, x0, t, noise=noise)["vb"]
        ratio = BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t]) / BETAS[t]
        expected = 0.0 * ratio if v < 0 else 0.5 * (ratio - 1 - np.log(ratio)) / math.log(2)
        np.testing.assert_allclose(vb.numpy(), expected, atol=2e-5)


def test_vb_at_t0_is_the_discretized_decoder_nll(diffusion):
    # At t = 0 the bound is -log2 of the model Gaussian's mass on x0's 8-bit bin (width 2/255; the
    # edge bins are open). Reference: the exact normal CDF (ADM uses a tanh approximation, ~1e-3 bits off).
    x0 = torch.tensor([-1.0, -1 + 2 / 255, 0 - 1 / 255, 1.0]).view(4, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    model = lambda x, tt: torch.cat([noise, torch.ones_like(x)], dim=1)  # noqa: E731  (v = +1: variance beta_0)
    vb = diffusion.training_losses(model, x0, torch.zeros(4, dtype=torch.long), noise=noise)["vb"]
    half_bin = (1 / 255) / math.sqrt(BETAS[0])
    inner = torch.special.ndtr(torch.tensor(half_bin)) - torch.special.ndtr(torch.tensor(-half_bin))
    edge = torch.special.ndtr(torch.tensor(half_bin))
    expected = -torch.log2(torch.stack([edge, inner, inner, edge])).float()
    torch.testing.assert_close(vb, expected, atol=5e-3, rtol=0)


def test_training_on_respaced_process_calls_model_with_original_timesteps():
    process = GaussianDiffusion(linear_betas(T), timestep_respacing="10")
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    process.training_losses(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 5, 9]))
    kept = space_timesteps(T, "10")
    assert seen[0].tolist() == [kept[0], kept[5], kept[9]]


def test_p_mean_variance_learned_range(diffusion):
    x = torch.randn(3, 2, 2, 2)
    t = torch.tensor([1, 50, 999])
    for v, name in ((-1.0, "posterior_log_variance_clipped"), (1.0, "log_betas")):
        out = diffusion.p_mean_variance(torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1), x, t)
        expected = torch.from_numpy(getattr(diffusion, name)[t.numpy()]).float().view(-1, 1, 1, 1).expand_as(x)
        torch.testing.assert_close(out["log_variance"], expected)
    with pytest.raises(HarnessError, match="channels"):
        diffusion.p_mean_variance(torch.zeros(3, 3, 2, 2), x, t)


# ------------------------------------------------------------------------------------------------
# Seeding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,eta", [("ddpm20", 0.0), ("ddim20", 0.5)])
def test_seeded_sampling_is_reproducible(diffusion, sampler, eta):
    y = torch.arange(6) % 7

    def draw(seed):
        return diffusion.sample(LabelModel(), (6, 4, 2, 2), y, sampler=sampler, cfg_scale=1.5, cfg_channels=3,
                                eta=eta, generator=torch.Generator().manual_seed(seed))

    first, second, other = draw(0), draw(0), draw(1)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    assert torch.isfinite(first).all()
