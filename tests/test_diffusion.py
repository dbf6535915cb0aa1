"""Prediction targets, preconditioning and loss weighting of the Denoiser wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from multidiff.diffusion import Denoiser, DiffusionConfig, add_noise, convert, loss_weight, to_eps, to_v, to_x0
from multidiff.schedules import get_schedule
from multidiff.spaces import Graph


@pytest.mark.parametrize("schedule", ["cosine", "flow", "karras", "edm_poly"])
def test_target_conversions_round_trip(schedule: str) -> None:
    s = get_schedule(schedule)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.79 + 0.2  # karras: sigma(0.2) = 80 * 0.2^7 = 1e-3
    a, sg = s.alpha(t), s.sigma(t)
    x0 = torch.randn(64, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 5, generator=g, dtype=torch.float64)
    xt = add_noise(x0, eps, a, sg)
    truth = {"x0": x0, "eps": eps, "v": to_v(eps, "eps", xt, a, sg)}
    # v definition: (alpha eps - sigma x0) / sqrt(alpha^2 + sigma^2)
    r = (a**2 + sg**2).sqrt()[:, None]
    assert torch.allclose(truth["v"], (a[:, None] * eps - sg[:, None] * x0) / r, atol=1e-12)
    for src in truth:
        for dst in truth:
            got = convert(truth[src], src, dst, xt, a, sg)
            assert torch.allclose(got, truth[dst], atol=1e-9, rtol=1e-9), (src, dst)
    assert torch.allclose(to_x0(to_eps(x0, "x0", xt, a, sg), "eps", xt, a, sg), x0, atol=1e-9)


class Oracle(nn.Module):
    """A backbone that knows x0: inverts the preconditioning and returns the exact target."""

    def __init__(self, x0: Tensor, den: "Denoiser", error: Tensor | None = None) -> None:
        super().__init__()
        self.x0, self.den, self.error = x0, den, error

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
        lam = (-8 * c_noise.to(torch.float64)).clamp(-40, 40)
        t = self.den.schedule.t_from_logsnr(lam)
        a, s = self.den.schedule.alpha(t)[:, None], self.den.schedule.sigma(t)[:, None]
        sd = self.den.sigma_data
        r2 = a**2 * sd**2 + s**2
        xt = x_in.to(torch.float64) * r2.sqrt()
        x0 = self.x0 + (self.error if self.error is not None else 0)
        if self.den.target == "x0":
            return x0
        if self.den.target == "eps":
            return (xt - a * x0) / s
        return ((sd**2 * a / r2) * xt - x0) / (s * sd / r2.sqrt())  # F such that c_skip x - c_out F = x0


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_denoiser_recovers_x0_from_the_exact_target(target: str, sigma_data: float) -> None:
    x0 = torch.randn(32, 4, dtype=torch.float64)
    den = Denoiser(nn.Identity(), "cosine", target=target, sigma_data=sigma_data, t_min=0.05)
    den.backbone = Oracle(x0, den)
    t = torch.linspace(0.05, 0.95, 32, dtype=torch.float64)
    eps = torch.randn_like(x0)
    xt = add_noise(x0, eps, den.schedule.alpha(t), den.schedule.sigma(t))
    assert torch.allclose(den(xt, t), x0, atol=1e-6)
    assert float(den.loss(x0)) < 1e-10


@pytest.mark.parametrize("weighting", ["x0", "eps", "v", "min_snr", "edm"])
def test_loss_weighting_scales_the_x0_error(weighting: str) -> None:
    """With a fixed error delta on the x0 estimate, the per-sample loss is w(logsnr) * mean(delta^2)."""
    torch.manual_seed(0)
    x0 = torch.randn(64, 3, dtype=torch.float64)
    delta = torch.full_like(x0, 0.1)
    den = Denoiser(nn.Identity(), "cosine", target="x0", weighting=weighting, min_snr_gamma=5.0)
    den.backbone = Oracle(x0, den, error=delta)
    g = torch.Generator().manual_seed(3)
    per = den.loss(x0, generator=g, reduce=False).to(torch.float64)
    t = den.sample_t(64, generator=torch.Generator().manual_seed(3))
    w = loss_weight(weighting, den.schedule.logsnr(t), 1.0, 5.0)
    assert torch.allclose(per, w * 0.01, rtol=1e-5)
    snr = den.schedule.logsnr(t).exp()
    expected = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1, "edm": snr + 1, "min_snr": snr.clamp(max=5)}
    assert torch.allclose(w, expected[weighting])


def test_lognormal_t_sampling_follows_edm() -> None:
    den = Denoiser(nn.Identity(), "karras", t_sampling="lognormal", lognormal_mean=-1.2, lognormal_std=1.2, t_min=0.0)
    t = den.sample_t(20000, generator=torch.Generator().manual_seed(0))
    log_sigma = den.schedule.sigma_ve(t).log()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.05 and abs(float(log_sigma.std()) - 1.2) < 0.05


def test_graph_space_loss_averages_per_graph() -> None:
    batch = torch.tensor([0, 0, 0, 1])
    x0 = torch.randn(4, 3, dtype=torch.float64)
    err = torch.tensor([[1.0], [1.0], [1.0], [2.0]], dtype=torch.float64).expand(4, 3)

    class Off(nn.Module):
        def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
            assert c_noise.shape == (2,)  # one noise level per graph
            return x0 + err

    den = Denoiser(Off(), "cosine", target="x0", weighting="x0")
    per = den.loss(x0, space=Graph(batch), reduce=False)
    assert torch.allclose(per, torch.tensor([1.0, 4.0]))


def test_config_builds_denoiser_and_rejects_bad_values() -> None:
    cfg = DiffusionConfig(schedule="vp_linear", target="eps", weighting="min_snr")
    den = Denoiser.from_config(nn.Identity(), cfg)
    assert den.schedule.name == "vp_linear" and den.weighting == "min_snr"
    with pytest.raises(ValueError, match="target: expected one of"):
        Denoiser(nn.Identity(), target="score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weighting"):
        Denoiser(nn.Identity(), weighting="p2")  # type: ignore[arg-type]
    with pytest.raises(FloatingPointError, match="NaN"):
        Denoiser(nn.Identity()).loss(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="t: expected a scalar or one time per sample"):
        Denoiser(nn.Identity())(torch.zeros(4, 2), torch.zeros(3))
