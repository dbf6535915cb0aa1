"""Guidance: classifier-free guidance, condition dropout, gradient guidance, inpainting and RePaint."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor

from multidiff.analytic import GaussianMixture
from multidiff.guidance import (
    UNCOND,
    ClassifierFreeGuidance,
    GradientGuidance,
    Inpaint,
    drop_conditions,
    inpaint,
    sample_repaint,
)
from multidiff.samplers import SAMPLERS, get_sampler, prior
from multidiff.schedules import get_schedule, make_grid

MIX = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.tensor([0.5, 0.5]))
SCH = get_schedule("cosine")


def cond_denoiser(x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
    """Exact class-conditional denoiser: label k -> component k, uncond -> the whole mixture."""
    t64 = torch.as_tensor(t, dtype=torch.float64)
    a, s = float(SCH.alpha(t64)), float(SCH.sigma(t64))
    full = MIX.posterior_mean(x, a, s)
    if cond is None or "label" not in cond:
        return full.to(x.dtype)
    var = a**2 * MIX.stds**2 + s**2
    mu = MIX.means[cond["label"]]
    gain = (a * MIX.stds**2 / var)[cond["label"], None]
    comp = mu + gain * (x.to(torch.float64) - a * mu)
    uncond = cond.get(UNCOND, torch.zeros(x.shape[0], dtype=torch.bool))
    return torch.where(uncond[:, None], full, comp).to(x.dtype)


def test_cfg_scale_one_is_plain_conditional_sampling() -> None:
    cond = {"label": torch.ones(64, dtype=torch.long)}
    ts = make_grid(SCH, 10)
    x = prior(SCH, ts[0], torch.zeros(64, 2, dtype=torch.float64), None, torch.Generator().manual_seed(0))
    for name in ("heun", "ancestral"):
        fn = get_sampler(name)
        guided = fn(ClassifierFreeGuidance(cond_denoiser, cond, 1.0), x, ts, SCH, generator=torch.Generator().manual_seed(1))
        plain = fn(lambda x, t: cond_denoiser(x, t, cond), x, ts, SCH, generator=torch.Generator().manual_seed(1))
        assert torch.equal(guided, plain)


def _counting() -> tuple[list[int], Callable[[Tensor, Tensor, dict[str, Tensor] | None], Tensor]]:
    """cond_denoiser that records the batch size of every call."""
    calls: list[int] = []

    def counting(x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        calls.append(x.shape[0])
        return cond_denoiser(x, t, cond)

    return calls, counting


def test_cfg_combines_cond_and_uncond_in_one_batched_call() -> None:
    calls, counting = _counting()
    cond = {"label": torch.tensor([0, 1, 1])}
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor(0.6, dtype=torch.float64)
    out = ClassifierFreeGuidance(counting, cond, 3.0)(x, t)
    assert calls == [6]
    d_c = cond_denoiser(x, t, cond)
    d_u = cond_denoiser(x, t, {**cond, UNCOND: torch.ones(3, dtype=torch.bool)})
    assert torch.allclose(out, d_u + 3.0 * (d_c - d_u))
    unbatched = ClassifierFreeGuidance(cond_denoiser, cond, 3.0, batched=False)(x, t)
    assert torch.allclose(out, unbatched)
    assert torch.allclose(ClassifierFreeGuidance(cond_denoiser, cond, 0.0)(x, t), d_u)


def test_cfg_interval_guides_only_inside_and_halves_the_calls_outside() -> None:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024): plain conditional outside (lo, hi]."""
    calls, counting = _counting()
    cond = {"label": torch.tensor([0, 1, 1])}
    x = torch.randn(3, 2, dtype=torch.float64)
    cfg = ClassifierFreeGuidance(counting, cond, 3.0, interval=(0.2, 0.7))
    inside, low, high = (torch.tensor(v, dtype=torch.float64) for v in (0.5, 0.1, 0.9))
    assert torch.allclose(cfg(x, inside), ClassifierFreeGuidance(cond_denoiser, cond, 3.0)(x, inside))
    assert not torch.allclose(cfg(x, inside), cond_denoiser(x, inside, cond))
    for t in (low, high, torch.tensor(0.2, dtype=torch.float64)):  # lo itself is outside
        assert torch.equal(cfg(x, t), cond_denoiser(x, t, cond))
    assert calls == [6, 6, 3, 3, 3]
    assert cfg.active(torch.full((3,), 0.5)) and not cfg.active(torch.full((3,), 0.9))  # one time per sample
    with pytest.raises(ValueError, match="one time per call"):
        cfg(x, torch.tensor([0.1, 0.5, 0.5], dtype=torch.float64))
    for bad in ((0.7, 0.2), (-0.1, 0.5), (0.5, 1.5)):
        with pytest.raises(ValueError, match="interval"):
            ClassifierFreeGuidance(counting, cond, 3.0, interval=bad)


def test_condition_dropout_rate_and_merge() -> None:
    cond = {"label": torch.zeros(20000, dtype=torch.long)}
    out = drop_conditions(cond, 0.2, 20000, generator=torch.Generator().manual_seed(0))
    assert abs(out[UNCOND].float().mean().item() - 0.2) < 0.015
    assert torch.equal(out["label"], cond["label"])
    forced = drop_conditions({**cond, UNCOND: torch.ones(20000, dtype=torch.bool)}, 0.0, 20000)
    assert forced[UNCOND].all()
    with pytest.raises(ValueError, match="probability"):
        drop_conditions(cond, 1.5, 3)


def test_gradient_guidance_with_exact_noisy_classifier_samples_the_class() -> None:
    """grad log p(k=1 | x_t) from the exact noisy classifier turns the mixture into component 1 (scale 1)."""

    def log_p1(x: Tensor, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64)
        a, s = SCH.alpha(t64), SCH.sigma(t64)
        var = a**2 * MIX.stds**2 + s**2
        d2 = ((x[:, None, :] - a * MIX.means[None]) ** 2).sum(-1)
        logits = torch.log(MIX.weights) - 0.5 * MIX.dof * torch.log(var) - 0.5 * d2 / var
        return torch.log_softmax(logits, -1)[:, 1]

    ts = make_grid(SCH, 60)
    g = torch.Generator().manual_seed(0)
    x = prior(SCH, ts[0], torch.zeros(2000, 2, dtype=torch.float64), None, g)
    guided = GradientGuidance(MIX.denoiser(SCH), log_p1, SCH, scale=1.0)
    out = get_sampler("heun")(guided, x, ts, SCH)
    assert (out[:, 0] > 0).float().mean() > 0.99
    assert torch.allclose(out.mean(0), MIX.means[1], atol=0.05)
    assert abs(float(out.var(0).mean()) - 0.25) < 0.03
    unguided = get_sampler("heun")(MIX.denoiser(SCH), x, ts, SCH)
    assert 0.4 < (unguided[:, 0] > 0).float().mean() < 0.6


def test_gradient_guidance_weight_plain_and_tempered() -> None:
    """A linear log-likelihood c.x shifts D by scale sigma^2/alpha c, times alpha^2/(alpha^2+sigma^2) when tempered."""
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    base = MIX.denoiser(SCH)
    for tv in (0.1, 0.5, 0.9):
        t = torch.tensor(tv, dtype=torch.float64)
        a, s = float(SCH.alpha(t)), float(SCH.sigma(t))
        for temper, factor in ((False, 1.0), (True, a**2 / (a**2 + s**2))):
            g = GradientGuidance(base, lambda x, t: x @ c, SCH, scale=2.0, temper=temper)
            shift = g(x, t) - base(x, t)
            assert torch.allclose(shift, (2.0 * s**2 / a * factor * c).expand_as(shift), rtol=1e-10, atol=0), (tv, temper)


def test_tempered_reconstruction_guidance_steers_toward_a_target() -> None:
    """DPS-style guidance on the x0 estimate toward x[0] = 2 turns most samples into the right component."""

    def near_two(x0: Tensor, t: Tensor) -> Tensor:
        return -0.5 * (x0[:, 0] - 2.0) ** 2 / 0.25

    ts = make_grid(SCH, 40)
    x = prior(SCH, ts[0], torch.zeros(1000, 2, dtype=torch.float64), None, torch.Generator().manual_seed(0))
    guided = GradientGuidance(MIX.denoiser(SCH), near_two, SCH, scale=1.0, through_denoiser=True, temper=True)
    out = get_sampler("heun")(guided, x, ts, SCH)
    unguided = get_sampler("heun")(MIX.denoiser(SCH), x, ts, SCH)
    assert torch.isfinite(out).all()
    assert (out[:, 0] > 0).float().mean() > 0.9 > 0.6 > (unguided[:, 0] > 0).float().mean()
    with pytest.raises(ValueError, match="finite"):
        GradientGuidance(MIX.denoiser(SCH), near_two, SCH, scale=float("nan"))
    with pytest.raises(ValueError, match="positive"):
        GradientGuidance(MIX.denoiser(SCH), near_two, SCH, clip=0.0)


def test_gradient_guidance_clip_bounds_each_entry_of_the_correction() -> None:
    c = torch.tensor([50.0, -0.01], dtype=torch.float64)
    x = torch.randn(7, 2, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64)
    base = MIX.denoiser(SCH)
    shift = GradientGuidance(base, lambda x, t: x @ c, SCH, scale=1.0, clip=0.2)(x, t) - base(x, t)
    a, s = float(SCH.alpha(t)), float(SCH.sigma(t))
    assert torch.allclose(shift[:, 0], torch.full((7,), 0.2, dtype=torch.float64))  # clipped
    assert torch.allclose(shift[:, 1], torch.full((7,), -0.01 * s**2 / a, dtype=torch.float64))  # below the bound


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_keeps_known_part_exactly(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    known = MIX.sample(256, g)[0]
    mask = torch.zeros(256, 2, dtype=torch.bool)
    mask[:, 0] = True
    ts = make_grid(SCH, 20)
    x = prior(SCH, ts[0], known, None, g)
    out = inpaint(MIX.denoiser(SCH), x, ts, SCH, known, mask, sampler=name, generator=g)
    assert torch.equal(out[:, 0], known[:, 0])
    assert not torch.allclose(out[:, 1], known[:, 1])


def test_inpainting_wrapper_alone_is_exact_for_samplers_that_end_on_the_denoised_value() -> None:
    known = torch.randn(64, 2, dtype=torch.float64)
    mask = torch.tensor([True, False]).expand(64, 2)
    ts = make_grid(SCH, 15)
    x = prior(SCH, ts[0], known, None, torch.Generator().manual_seed(0))
    for name in ("ddim", "heun", "dpmpp_2m", "ancestral"):
        wrapped = Inpaint(MIX.denoiser(SCH), known, mask, SCH, generator=torch.Generator().manual_seed(1))
        out = get_sampler(name)(wrapped, x, ts, SCH, generator=torch.Generator().manual_seed(2))
        assert torch.equal(out[:, 0], known[:, 0]), name


def test_repaint_keeps_known_part_and_matches_the_conditional() -> None:
    """A correlated 2-D Gaussian: given x1, x2 | x1 ~ N(rho x1, 1 - rho^2).

    Plain replacement (resample=1) is known to be biased towards the prior (mean 0.83 instead of 1.35
    here); RePaint's resampling removes most of that bias (1.33 at 20 resamplings).
    """
    rho = 0.9
    chol = torch.tensor([[1.0, 0.0], [rho, math.sqrt(1 - rho**2)]], dtype=torch.float64)

    def denoise(x: Tensor, t: Tensor) -> Tensor:  # exact posterior mean for N(0, C)
        t64 = torch.as_tensor(t, dtype=torch.float64)
        a, s = float(SCH.alpha(t64)), float(SCH.sigma(t64))
        c = chol @ chol.T
        gain = a * c @ torch.linalg.inv(a**2 * c + s**2 * torch.eye(2, dtype=torch.float64))
        return x @ gain.T

    n = 3000
    known = torch.zeros(n, 2, dtype=torch.float64)
    known[:, 0] = 1.5
    mask = torch.tensor([True, False]).expand(n, 2)
    ts = make_grid(SCH, 25)
    err = {}
    for resample in (1, 20):
        g = torch.Generator().manual_seed(0)
        x = prior(SCH, ts[0], known, None, g)
        out = sample_repaint(denoise, x, ts, SCH, known, mask, resample=resample, generator=g)
        assert torch.equal(out[:, 0], known[:, 0])
        err[resample] = abs(float(out[:, 1].mean()) - rho * 1.5)
    assert err[1] > 0.3 and err[20] < 0.06
