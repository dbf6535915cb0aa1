"""Schedules: VP identities, monotone logSNR, endpoints, inverses, derivatives, step grids."""

from __future__ import annotations

import math

import pytest
import torch

from multidiff.schedules import (
    SCHEDULES,
    Cosine,
    EDMPolynomial,
    Flow,
    Karras,
    VPLinear,
    get_schedule,
    make_grid,
)

T = torch.linspace(0, 1, 2001, dtype=torch.float64)[1:-1]
VP = ["vp_linear", "cosine", "edm_poly", "sigmoid"]


@pytest.mark.parametrize("name", VP)
def test_vp_identity(name: str) -> None:
    s = get_schedule(name)
    assert torch.allclose(s.alpha(T) ** 2 + s.sigma(T) ** 2, torch.ones_like(T), atol=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_logsnr_strictly_decreasing_and_consistent(name: str) -> None:
    s = get_schedule(name)
    lam = s.logsnr(T)
    assert (lam[1:] < lam[:-1]).all()
    assert torch.allclose(lam, 2 * torch.log(s.alpha(T) / s.sigma(T)), atol=1e-8)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_inverse_round_trip(name: str) -> None:
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(s.t_from_logsnr(s.logsnr(t)), t, atol=1e-7)
    assert torch.allclose(s.t_from_sigma_ve(s.sigma_ve(t)), t, atol=1e-7)


def test_endpoints() -> None:
    # data at t = 0, (almost) pure noise at t = 1
    assert float(VPLinear().sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0
    assert float(Cosine().sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0
    assert math.isclose(float(Cosine().logsnr(torch.tensor(1.0, dtype=torch.float64))), -20.0, abs_tol=1e-9)
    # DDPM: alpha_bar(1) = prod(1 - beta_i) for beta linear 1e-4 .. 0.02 over 1000 steps, about 4.0e-5
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.prod(1 - betas)
    a2 = float(VPLinear().alpha(torch.tensor(1.0, dtype=torch.float64)) ** 2)
    assert math.isclose(a2, float(abar), rel_tol=0.1)
    # EDM (Hoogeboom et al. 2022): alpha^2 = (1 - 2s)(1 - t^2)^2 + s
    e = EDMPolynomial(precision=1e-5)
    assert math.isclose(float(e.alpha(torch.tensor(0.0, dtype=torch.float64)) ** 2), 1 - 1e-5, rel_tol=1e-12)
    assert math.isclose(float(e.alpha(torch.tensor(1.0, dtype=torch.float64)) ** 2), 1e-5, rel_tol=1e-9)
    k = Karras(0.002, 80.0)
    assert math.isclose(float(k.sigma(torch.tensor(1.0, dtype=torch.float64))), 80.0, rel_tol=1e-12)
    assert math.isclose(float(k.sigma(torch.tensor(0.0, dtype=torch.float64))), 0.002, rel_tol=1e-12)
    f = Flow()
    assert float(f.alpha(torch.tensor(1.0))) == 0.0 and float(f.sigma(torch.tensor(1.0))) == 1.0


def test_cosine_matches_nichol_shape() -> None:
    # without the clip, alpha(t) = cos(pi t / 2), Nichol & Dhariwal's curve for s = 0
    s = Cosine(logsnr_min=-60)
    t = torch.linspace(0.0, 0.95, 20, dtype=torch.float64)
    assert torch.allclose(s.alpha(t), torch.cos(math.pi * t / 2), atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_derivatives_match_finite_differences(name: str) -> None:
    s = get_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    da, ds = s.derivatives(t)
    assert torch.allclose(da, (s.alpha(t + h) - s.alpha(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ds, (s.sigma(t + h) - s.sigma(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ["uniform", "logsnr", "karras"])
def test_grids_are_strictly_decreasing_and_end_at_zero(name: str, kind: str) -> None:
    s = get_schedule(name)
    for steps in (1, 2, 7, 50):
        ts = make_grid(s, steps, kind)
        assert ts.shape == (steps + 1,)
        assert ts[-1] == 0.0 and ts[0] <= 1.0
        assert (ts[1:] < ts[:-1]).all()


def test_karras_grid_spacing() -> None:
    # EDM eq. 5 with sigma_min = 0.002, sigma_max = 80, rho = 7 on the VE schedule itself
    s = Karras()
    ts = make_grid(s, 18, "karras")
    sig = s.sigma(ts[:-1])
    i = torch.arange(18, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(sig, expected, rtol=1e-9)


def test_logsnr_grid_is_uniform_in_logsnr() -> None:
    s = get_schedule("vp_linear")
    ts = make_grid(s, 10, "logsnr")
    lam = s.logsnr(ts[:-1])
    steps = lam[1:] - lam[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-6)


def test_bad_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'cosinus'.*cosine"):
        get_schedule("cosinus")
    with pytest.raises(ValueError, match="unknown grid 'linear'"):
        make_grid(Cosine(), 10, "linear")
    with pytest.raises(ValueError, match="steps"):
        make_grid(Cosine(), 0)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPLinear(beta_min=5, beta_max=1)
    with pytest.raises(ValueError, match="bad parameters"):
        get_schedule("cosine", sigma_max=3.0)
