"""Training objectives of the core: flow matching (x0 / velocity targets), training-time distributions, a
noise <-> data coupling hook and self-conditioning; every sampler, CFG, inpainting and gradient guidance on the
``flow`` schedule, checked against the analytic Gaussian-mixture denoiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from multidiff.analytic import GaussianMixture
from multidiff.diffusion import Denoiser, DiffusionConfig, SelfConditioning
from multidiff.guidance import UNCOND, ClassifierFreeGuidance, GradientGuidance, inpaint
from multidiff.samplers import SAMPLERS, get_sampler, prior
from multidiff.schedules import get_schedule, make_grid

FLOW = get_schedule("flow")
MIX = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.4, 0.4]))


class VelocityOracle(nn.Module):
    """Backbone returning the exact flow-matching velocity E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / t of ``MIX``."""

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
        t = FLOW.t_from_logsnr(-8 * c_noise.to(torch.float64))  # c_noise = -logsnr / 8 (EDM's ln(sigma) / 4)
        a, s = 1 - t[:, None], t[:, None]
        xt = x_in.to(torch.float64) * torch.sqrt(a**2 + s**2)  # undo c_in = 1 / sqrt(alpha^2 + sigma^2)
        d = torch.stack([MIX.posterior_mean(xt[i : i + 1], float(a[i]), float(s[i]))[0] for i in range(len(t))])
        return (xt - d) / s


def test_velocity_target_recovers_the_analytic_denoiser() -> None:
    den = Denoiser(VelocityOracle(), "flow", target="velocity")
    g = torch.Generator().manual_seed(0)
    x0 = MIX.sample(64, g)[0]
    t = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(64, 2, generator=g, dtype=torch.float64)
    expected = torch.stack([MIX.posterior_mean(xt[i : i + 1], float(1 - t[i]), float(t[i]))[0] for i in range(64)])
    assert torch.allclose(den(xt, t), expected, atol=1e-9)


def test_velocity_of_the_flow_schedule_is_eps_minus_x0() -> None:
    """A backbone that returns eps - x0 (Lipman et al. 2023) makes the velocity Denoiser return x0 exactly."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.05
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps

    class Known(nn.Module):
        def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
            return eps - x0

    assert torch.allclose(Denoiser(Known(), "flow", target="velocity")(xt, t), x0, atol=1e-10)


def test_x0_target_on_flow_trains_to_a_small_loss_with_an_exact_backbone() -> None:
    x0 = torch.randn(32, 4, dtype=torch.float64)

    class Exact(nn.Module):
        def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
            return x0

    assert float(Denoiser(Exact(), "flow", target="x0").loss(x0)) < 1e-12


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_reproduces_the_mixture_on_the_flow_schedule(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    ts = make_grid(FLOW, 40, "karras")
    x = prior(FLOW, ts[0], torch.zeros(3000, 2, dtype=torch.float64), None, g)
    out = get_sampler(name)(MIX.denoiser(FLOW), x, ts, FLOW, generator=g)
    right = out[:, 0] > 0
    assert abs(float(right.double().mean()) - 0.5) < 0.05
    assert abs(float(out[right, 0].mean()) - 2.0) < 0.1 and abs(float(out[~right, 0].mean()) + 2.0) < 0.1
    assert abs(float(out[right, 1].std()) - 0.4) < 0.06


def _flow_cond_denoiser(x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
    """Exact class-conditional denoiser of ``MIX`` on the flow schedule (label k -> component k)."""
    a, s = float(1 - t), float(t)
    full = MIX.posterior_mean(x, a, s)
    if cond is None:
        return full
    var = a**2 * MIX.stds**2 + s**2
    mu = MIX.means[cond["label"]]
    comp = mu + (a * MIX.stds**2 / var)[cond["label"], None] * (x - a * mu)
    uncond = cond.get(UNCOND, torch.zeros(x.shape[0], dtype=torch.bool))
    return torch.where(uncond[:, None], full, comp)


def test_classifier_free_guidance_on_flow() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.ones(2000, dtype=torch.long)  # component at (+2, 0)
    ts = make_grid(FLOW, 30, "uniform")
    x = prior(FLOW, ts[0], torch.zeros(2000, 2, dtype=torch.float64), None, g)
    plain = get_sampler("heun")(ClassifierFreeGuidance(_flow_cond_denoiser, {"label": labels}, 1.0), x, ts, FLOW)
    guided = get_sampler("heun")(ClassifierFreeGuidance(_flow_cond_denoiser, {"label": labels}, 3.0), x, ts, FLOW)
    assert float((plain[:, 0] > 0).double().mean()) > 0.99  # the conditional component
    assert abs(float(plain[:, 0].mean()) - 2.0) < 0.05
    assert float(guided[:, 0].mean()) > 2.0 + 0.05  # guidance > 1 pushes beyond the conditional mean


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_on_flow_keeps_the_known_part(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    known = MIX.sample(256, g)[0]
    mask = torch.zeros(256, 2, dtype=torch.bool)
    mask[:, 0] = True
    ts = make_grid(FLOW, 20, "karras")
    x = prior(FLOW, ts[0], known, None, g)
    out = inpaint(MIX.denoiser(FLOW), x, ts, FLOW, known, mask, sampler=name, generator=g)
    assert torch.equal(out[:, 0], known[:, 0])
    # the free coordinate is generated around its true law N(0, 0.4^2); plain replacement under-disperses it a little
    assert abs(float(out[:, 1].mean())) < 0.08 and 0.25 < float(out[:, 1].std()) < 0.5


def test_gradient_guidance_on_flow_moves_toward_the_target() -> None:
    g = torch.Generator().manual_seed(0)
    ts = make_grid(FLOW, 30, "uniform")
    x = prior(FLOW, ts[0], torch.zeros(2000, 2, dtype=torch.float64), None, g)
    log_prob = lambda x0, t: -((x0[:, 0] - 2.0) ** 2)  # noqa: E731  (a Gaussian likelihood around x = 2)
    guided = GradientGuidance(MIX.denoiser(FLOW), log_prob, FLOW, 2.0, through_denoiser=True, temper=True)
    base = get_sampler("euler")(MIX.denoiser(FLOW), x, ts, FLOW)
    out = get_sampler("euler")(guided, x, ts, FLOW)
    assert float((base[:, 0] > 0).double().mean()) < 0.6
    assert float((out[:, 0] > 0).double().mean()) > 0.8


# --- training-time distributions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, cdf",
    [
        ({"t_sampling": "logit_normal", "logit_normal_mean": -0.5, "logit_normal_std": 1.3},
         lambda t: stats.norm.cdf((np.log(t / (1 - t)) + 0.5) / 1.3)),
        ({"t_sampling": "beta", "beta_a": 1.0, "beta_b": 2.0}, lambda t: stats.beta.cdf(t, 1.0, 2.0)),
        ({"t_sampling": "beta", "beta_a": 2.5, "beta_b": 0.7}, lambda t: stats.beta.cdf(t, 2.5, 0.7)),
    ],
    ids=["logit_normal", "beta_1_2", "beta_2.5_0.7"],
)
def test_training_time_distributions_follow_their_laws(kw: dict, cdf) -> None:
    den = Denoiser(nn.Identity(), "flow", t_min=0.0, **kw)
    t = den.sample_t(20000, generator=torch.Generator().manual_seed(0)).numpy()
    assert stats.kstest(t, cdf).pvalue > 1e-3


def test_training_time_distribution_bad_input() -> None:
    with pytest.raises(ValueError, match="t_sampling"):
        Denoiser(nn.Identity(), "flow", t_sampling="gamma")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta_a"):
        Denoiser(nn.Identity(), "flow", t_sampling="beta", beta_a=0.0)


# --- coupling hook --------------------------------------------------------------------------------------------------


def test_coupling_is_applied_to_the_noise_before_interpolation() -> None:
    seen: list[Tensor] = []

    def couple(x0: Tensor, noise: Tensor, space) -> Tensor:
        seen.append(noise)
        return torch.zeros_like(noise)  # a (degenerate) coupling: then x_t = alpha x0 exactly

    class Record(nn.Module):
        def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
            self.x_in = x_in
            return torch.zeros_like(x_in)

    backbone = Record()
    den = Denoiser(backbone, "flow", target="x0", coupling=couple, t_min=0.0)
    x0 = torch.randn(8, 3)
    torch.manual_seed(0)
    den.loss(x0)
    assert len(seen) == 1 and seen[0].shape == x0.shape
    torch.manual_seed(0)
    t = den.sample_t(8)
    c_in = 1 / torch.sqrt((1 - t) ** 2 + t**2)
    assert torch.allclose(backbone.x_in, (c_in * (1 - t))[:, None].float() * x0, atol=1e-6)


def test_named_coupling_needs_a_callable() -> None:
    with pytest.raises(ValueError, match="coupling"):
        Denoiser.from_config(nn.Identity(), DiffusionConfig(coupling="equivariant_ot"))


# --- self-conditioning ----------------------------------------------------------------------------------------------


class SelfCondBackbone(nn.Module):
    """Returns 0 without a self-conditioning input and (that input + 1) with one; records the calls."""

    supports_self_conditioning = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Tensor | None] = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None, self_cond: Tensor | None = None) -> Tensor:
        self.calls.append(self_cond)
        base = torch.zeros_like(x_in) + self.w
        return base if self_cond is None else self_cond + 1 + self.w


def test_self_conditioning_training_feeds_the_first_estimate_back() -> None:
    backbone = SelfCondBackbone()
    den = Denoiser(backbone, "flow", target="x0", self_condition=1.0)
    den.loss(torch.randn(4, 2))
    assert len(backbone.calls) == 2 and backbone.calls[0] is None
    assert torch.equal(backbone.calls[1], torch.zeros(4, 2))  # the first pass's x0 estimate (x0 target: output)
    assert not backbone.calls[1].requires_grad

    backbone.calls.clear()
    den = Denoiser(backbone, "flow", target="x0", self_condition=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        den.loss(torch.randn(4, 2), generator=g)
    second_passes = sum(c is not None for c in backbone.calls)
    assert len(backbone.calls) == 200 + second_passes and 70 < second_passes < 130  # Binomial(200, 0.5)


def test_self_conditioning_at_sampling_feeds_the_previous_step() -> None:
    backbone = SelfCondBackbone()
    den = Denoiser(backbone, "flow", target="x0", self_condition=0.5)
    sc = SelfConditioning(lambda x, t, cond, **kw: den(x, t, cond, **kw))
    denoise = lambda x, t: sc.update(sc(x, t, None))  # noqa: E731
    ts = make_grid(FLOW, 3, "uniform")
    get_sampler("euler")(denoise, torch.zeros(5, 2), ts, FLOW)
    assert backbone.calls[0] is None
    assert [float(c[0, 0]) for c in backbone.calls[1:]] == [0.0, 1.0]  # outputs 0, then prev + 1


def test_self_conditioning_needs_a_backbone_that_takes_it() -> None:
    with pytest.raises(ValueError, match="self-conditioning"):
        Denoiser(nn.Identity(), "flow", self_condition=0.5)
    with pytest.raises(ValueError, match="self_condition"):
        Denoiser(SelfCondBackbone(), "flow", self_condition=1.5)



# --- categorical parts ----------------------------------------------------------------------------------------------

PI = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)


def _categorical_oracle(schedule):
    """Exact posterior p(x0 = j | x_t = c) ∝ pi_j ((1 - kappa) [j = c] + kappa / K) of independent rows (Bayes)."""

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64)
        k = float(schedule.sigma(t64) / (schedule.alpha(t64) + schedule.sigma(t64)))
        post = PI * ((1 - k) * x.to(torch.float64) + k / len(PI))
        return (post / post.sum(-1, keepdim=True)).to(x.dtype)

    return denoise


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_categorical_part_sampled_with_the_exact_posterior_follows_the_data_law(name: str) -> None:
    from multidiff.spaces import Categorical

    space = Categorical(3)
    g = torch.Generator().manual_seed(0)
    ts = make_grid(FLOW, 30, "karras")
    x = prior(FLOW, ts[0], torch.zeros(20000, 3, dtype=torch.float64), space, g)
    assert torch.equal(x.sum(-1), torch.ones(20000, dtype=torch.float64))  # one-hot, unscaled
    out = get_sampler(name)(_categorical_oracle(FLOW), x, ts, FLOW, space, generator=g)
    assert set(out.unique().tolist()) <= {0.0, 1.0} and torch.equal(out.sum(-1), torch.ones(20000, dtype=torch.float64))
    freq = out.mean(0)
    assert torch.allclose(freq, PI, atol=0.015), freq


def test_categorical_part_beside_a_continuous_part() -> None:
    """Product(Euclidean x Categorical): the continuous columns follow the mixture, the categorical ones pi."""
    from multidiff.spaces import Categorical, Euclidean, Product

    space = Product([(slice(0, 2), Euclidean()), (slice(2, 5), Categorical(3))])
    cat = _categorical_oracle(FLOW)
    denoise = lambda x, t: torch.cat([MIX.denoiser(FLOW)(x[:, :2], t), cat(x[:, 2:], t)], -1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ts = make_grid(FLOW, 30, "karras")
    x = prior(FLOW, ts[0], torch.zeros(4000, 5, dtype=torch.float64), space, g)
    out = get_sampler("heun")(denoise, x, ts, FLOW, space, generator=g)
    assert abs(float((out[:, 0] > 0).double().mean()) - 0.5) < 0.05
    assert torch.allclose(out[:, 2:].mean(0), PI, atol=0.03)


def test_categorical_loss_is_weighted_cross_entropy_and_input_is_unscaled() -> None:
    from multidiff.spaces import Categorical, Euclidean, Product

    logits = torch.tensor([2.0, -1.0, 0.5])

    class Fixed(nn.Module):
        def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
            self.x_in = x_in
            return torch.cat([torch.zeros(x_in.shape[0], 2), logits.expand(x_in.shape[0], 3)], -1)

    space = Product([(slice(0, 2), Euclidean()), (slice(2, 5), Categorical(3))])
    x0 = torch.cat([torch.zeros(6, 2), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()], -1)
    backbone = Fixed()
    ce_true = -torch.log_softmax(logits.double(), -1)[[0, 1, 2, 0, 1, 2]].mean()
    for weight in (0.0, 0.4):
        den = Denoiser(backbone, "flow", target="x0", categorical_weight=weight)
        loss = den.loss(x0, space=space)  # continuous part exact (zeros), so the loss is the weighted CE alone
        assert float(loss) == pytest.approx(weight * float(ce_true), rel=1e-5)
        assert set(backbone.x_in[:, 2:].unique().tolist()) <= {0.0, 1.0}  # one-hot, not scaled by c_in


def test_categorical_bad_input() -> None:
    from multidiff.spaces import Categorical

    with pytest.raises(ValueError, match="at least 2 classes"):
        Categorical(1)
    with pytest.raises(ValueError, match="3 one-hot columns"):
        Categorical(3).check(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="categorical_weight"):
        Denoiser(nn.Identity(), "flow", categorical_weight=-1.0)


def test_a_space_without_continuous_entries_has_no_continuous_error() -> None:
    """continuous_mean_per_sample averages continuous entries only: zeros for Categorical and an all-categorical
    Product (the one-hot columns are never compared as numbers), the continuous part alone for a mixed Product."""
    from multidiff.spaces import Categorical, Euclidean, Product

    x = torch.rand(4, 5, dtype=torch.float64)
    assert torch.equal(Categorical(5).continuous_mean_per_sample(x), torch.zeros(4, dtype=torch.float64))
    both = Product([(slice(0, 2), Categorical(2)), (slice(2, 5), Categorical(3))])
    assert torch.equal(both.continuous_mean_per_sample(x), torch.zeros(4, dtype=torch.float64))
    mixed = Product([(slice(0, 2), Euclidean()), (slice(2, 5), Categorical(3))])
    assert torch.allclose(mixed.continuous_mean_per_sample(x), x[:, :2].mean(1))
