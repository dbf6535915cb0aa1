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


# --- EDM's preconditioning written out by hand (Karras et al. 2022, Table 1), the outside reference ---------------
#
# EDM works in variance-exploding coordinates: x = y + sigma n (y the data, n ~ N(0, I)), network F_theta, and
#     D(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))
#     c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2),
#     c_noise = ln(sigma) / 4,  training target F = (y - c_skip x) / c_out   (sd = sigma_data).
# The Denoiser works in native coordinates x_t = alpha x0 + sigma_t eps, so EDM's x is x_t / alpha and EDM's sigma is
# sigma_t / alpha (the schedule's sigma_ve). Its "v" backbone output is v = (alpha eps - sigma_t x0) / r (Salimans &
# Ho 2022 for sd = 1), which is minus EDM's F target; both facts are checked below against the formulas above only.


def edm_table1(sigma: Tensor, sd: float) -> dict[str, Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1, "Ours" column), nothing taken from multidiff."""
    return {
        "c_skip": sd**2 / (sigma**2 + sd**2),
        "c_out": sigma * sd / torch.sqrt(sigma**2 + sd**2),
        "c_in": 1 / torch.sqrt(sigma**2 + sd**2),
        "c_noise": torch.log(sigma) / 4,
    }


class Spy(nn.Module):
    """A backbone that records what it receives and returns a fixed F."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
        self.calls.append((x_in.detach().clone(), c_noise.detach().clone()))
        return self.out  # float64: the combination is checked to 1e-9


SCHEDULES_UNDER_TEST = ["cosine", "vp_linear", "edm_poly", "sigmoid", "karras", "flow"]


@pytest.mark.parametrize("schedule", SCHEDULES_UNDER_TEST)
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_v_preconditioning_is_edm_table1(schedule: str, sigma_data: float) -> None:
    """target="v": the backbone sees c_in * (x_t / alpha) and c_noise = ln(sigma_ve) / 4, and its output F enters the
    x0 estimate as EDM's D = c_skip (x_t / alpha) + c_out (-F), with EDM's published coefficients."""
    g = torch.Generator().manual_seed(0)
    n = 24
    t = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
    F = torch.randn(n, 3, generator=g, dtype=torch.float64)
    spy = Spy(F)
    den = Denoiser.from_config(spy, DiffusionConfig(schedule=schedule, target="v", sigma_data=sigma_data))
    sched = get_schedule(schedule)
    alpha, sigma_t = sched.alpha(t), sched.sigma(t)
    x_t = torch.randn(n, 3, generator=g, dtype=torch.float64) * 3
    denoised = den(x_t, t)

    sigma = sigma_t / alpha  # EDM's sigma; x_t / alpha is EDM's x = y + sigma n
    x_edm = x_t / alpha[:, None]
    edm = edm_table1(sigma, sigma_data)
    (x_in, c_noise), = spy.calls
    assert torch.allclose(x_in.to(torch.float64), edm["c_in"][:, None] * x_edm, rtol=1e-5, atol=1e-6)
    assert torch.allclose(c_noise.to(torch.float64), edm["c_noise"], rtol=1e-5, atol=1e-6)
    expected = edm["c_skip"][:, None] * x_edm + edm["c_out"][:, None] * (-F)
    assert torch.allclose(denoised, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "karras", "flow"])
def test_v_target_is_minus_edm_f_target_and_salimans_v(schedule: str) -> None:
    """The loss of target="v" vanishes exactly for F = -(x0 - c_skip x) / c_out (EDM's training target, by hand), and on
    a variance-preserving schedule that F is Salimans & Ho's v = alpha eps - sigma x0."""
    g = torch.Generator().manual_seed(1)
    n, sd = 16, 1.0
    t = torch.linspace(0.1, 0.9, n, dtype=torch.float64)
    sched = get_schedule(schedule)
    alpha, sigma_t = sched.alpha(t), sched.sigma(t)
    x0 = torch.randn(n, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x_t = alpha[:, None] * x0 + sigma_t[:, None] * eps
    sigma = sigma_t / alpha
    edm = edm_table1(sigma, sd)
    f_target = (x0 - edm["c_skip"][:, None] * (x_t / alpha[:, None])) / edm["c_out"][:, None]
    den = Denoiser.from_config(Spy(-f_target), DiffusionConfig(schedule=schedule, target="v", sigma_data=sd))
    assert torch.allclose(den(x_t, t), x0, atol=1e-9)
    if schedule == "cosine":  # alpha^2 + sigma^2 = 1
        assert torch.allclose(-f_target, alpha[:, None] * eps - sigma_t[:, None] * x0, atol=1e-9)


class EDMOracle(nn.Module):
    """A backbone that knows x0 and reads (x_t, sigma) back from its inputs through EDM's c_in / c_noise only, then
    returns the exact target of each kind in EDM's terms. If the Denoiser's c_in, c_noise, c_skip or c_out differ from
    Table 1, the estimate is not x0."""

    def __init__(self, x0: Tensor, target: str, sd: float) -> None:
        super().__init__()
        self.x0, self.target, self.sd = x0, target, sd

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
        sigma = torch.exp(4 * c_noise.to(torch.float64))[:, None]  # c_noise = ln(sigma) / 4
        x_edm = x_in.to(torch.float64) * torch.sqrt(sigma**2 + self.sd**2)  # c_in = 1 / sqrt(sigma^2 + sd^2)
        y = self.x0
        if self.target == "x0":
            return y
        if self.target == "eps":  # x_edm = y + sigma eps
            return (x_edm - y) / sigma
        edm = edm_table1(sigma, self.sd)
        return -(y - edm["c_skip"] * x_edm) / edm["c_out"]  # v = minus EDM's F target


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_denoiser_recovers_x0_from_the_exact_target(target: str, sigma_data: float) -> None:
    x0 = torch.randn(32, 4, dtype=torch.float64)
    den = Denoiser(nn.Identity(), "cosine", target=target, sigma_data=sigma_data, t_min=0.05)
    den.backbone = EDMOracle(x0, target, sigma_data)
    t = torch.linspace(0.05, 0.95, 32, dtype=torch.float64)
    eps = torch.randn_like(x0)
    xt = add_noise(x0, eps, den.schedule.alpha(t), den.schedule.sigma(t))
    assert torch.allclose(den(xt, t), x0, atol=1e-6)
    assert float(den.loss(x0)) < 1e-10


class Fixed(nn.Module):
    """An x0-predicting backbone that is off by a known error."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x_in: Tensor, c_noise: Tensor, cond: dict | None = None) -> Tensor:
        return self.out


@pytest.mark.parametrize("weighting", ["x0", "eps", "v", "min_snr", "edm"])
def test_loss_weighting_scales_the_x0_error(weighting: str) -> None:
    """With a fixed error delta on the x0 estimate, the per-sample loss is w(logsnr) * mean(delta^2)."""
    torch.manual_seed(0)
    x0 = torch.randn(64, 3, dtype=torch.float64)
    delta = torch.full_like(x0, 0.1)
    den = Denoiser(nn.Identity(), "cosine", target="x0", weighting=weighting, min_snr_gamma=5.0)
    den.backbone = Fixed(x0 + delta)
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
