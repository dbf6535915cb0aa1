"""Samplers against exact denoisers of Gaussian mixtures: distributions, convergence, determinism, errors.

Tolerances: with N samples a component of weight w has weight standard error sqrt(w(1-w)/N), mean standard
error s/sqrt(wN) per coordinate and relative variance standard error sqrt(2/(wN d)) (d coordinates averaged).
Each check allows about 5 standard errors plus a small discretisation allowance, so a correct sampler
fails with negligible probability while a wrong noise scale (e.g. sqrt(2) too much) or a biased step fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from multidiff.analytic import GaussianMixture, centering_projector
from multidiff.samplers import SAMPLERS, StepInfo, get_sampler, nfe, prior, sample
from multidiff.schedules import get_schedule, make_grid
from multidiff.spaces import ZeroCoM

N = 4000
# steps at which each sampler is "converged" on these mixtures (grid: karras)
STEPS = {"ddim": 200, "euler": 200, "heun": 60, "dpmpp_2m": 100, "ancestral": 400, "euler_maruyama": 400,
         "adaptive": 25}  # adaptive uses only the grid's end points (see tests/test_adaptive.py)


def _mixture_1d() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([0.4, 0.6]))


def _mixture_2d() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([0.2, 0.5, 0.3]),
        torch.tensor([[-3.0, 0.0], [2.0, 2.0], [1.5, -2.5]]),
        torch.tensor([0.5, 0.7, 0.4]),
    )


def _check_mixture(x: torch.Tensor, gm: GaussianMixture, allowance: float = 0.02) -> None:
    """Assign samples to the nearest mean and compare weights, means and variances with the truth."""
    x = x.to(torch.float64)
    d2 = ((x[:, None, :] - gm.means[None]) ** 2).sum(-1)
    comp = d2.argmin(1)
    n = x.shape[0]
    for k in range(gm.means.shape[0]):
        w = float(gm.weights[k])
        xk = x[comp == k]
        se_w = math.sqrt(w * (1 - w) / n)
        assert abs(xk.shape[0] / n - w) < 5 * se_w + allowance, f"component {k}: weight {xk.shape[0] / n:.3f} vs {w}"
        s = float(gm.stds[k])
        se_m = s / math.sqrt(w * n)
        err_m = (xk.mean(0) - gm.means[k]).abs().max()
        assert err_m < 5 * se_m + allowance, f"component {k}: mean off by {err_m:.3f}"
        # variance per coordinate within the subspace: total squared deviation / (dof)
        var = ((xk - xk.mean(0)) ** 2).sum(1).mean() / gm.dof
        rel = float(var / s**2 - 1)
        assert abs(rel) < 5 * math.sqrt(2 / (w * n * gm.dof)) + 5 * allowance, f"component {k}: variance off by {rel:+.3f}"


def _run(name: str, gm: GaussianMixture, schedule: str = "cosine", space=None, like=None, seed: int = 0) -> torch.Tensor:
    sch = get_schedule(schedule)
    ts = make_grid(sch, STEPS[name], "karras")
    g = torch.Generator().manual_seed(seed)
    like = like if like is not None else torch.zeros(N, gm.dim, dtype=torch.float64)
    x = prior(sch, ts[0], like, space, g)
    return get_sampler(name)(gm.denoiser(sch), x, ts, sch, space, generator=g)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_reproduces_1d_mixture(name: str) -> None:
    gm = _mixture_1d()
    _check_mixture(_run(name, gm), gm)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_reproduces_2d_mixture(name: str) -> None:
    gm = _mixture_2d()
    _check_mixture(_run(name, gm, seed=1), gm)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_reproduces_mixture_on_zero_com_space(name: str) -> None:
    """Molecules of 4 atoms in 3-D: a 2-component mixture living in the 9-dim zero-CoM subspace."""
    atoms, graphs = 4, 1500
    proj = centering_projector(atoms)
    g = torch.Generator().manual_seed(3)
    means = torch.randn(2, atoms * 3, generator=g, dtype=torch.float64) * 2.0
    gm = GaussianMixture(torch.tensor([0.4, 0.6]), means, torch.tensor([0.5, 0.3]), projector=proj)
    batch = torch.arange(graphs).repeat_interleave(atoms)
    space = ZeroCoM(batch)
    like = torch.zeros(graphs * atoms, 3, dtype=torch.float64)
    sch = get_schedule("cosine")
    ts = make_grid(sch, STEPS[name], "karras")
    x = prior(sch, ts[0], like, space, g)
    den = gm.denoiser(sch)  # reshapes rows [graphs*atoms, 3] to [graphs, 12] internally
    out = get_sampler(name)(den, x, ts, sch, space, generator=g)
    com = space.centre_of_mass(out)
    assert com.abs().max() < 1e-10
    _check_mixture_graphs(out.reshape(graphs, atoms * 3), gm)


def _check_mixture_graphs(flat: torch.Tensor, gm: GaussianMixture) -> None:
    n = flat.shape[0]
    comp = ((flat[:, None] - gm.means[None]) ** 2).sum(-1).argmin(1)
    for k in range(2):
        w = float(gm.weights[k])
        xk = flat[comp == k]
        assert abs(xk.shape[0] / n - w) < 5 * math.sqrt(w * (1 - w) / n) + 0.02
        s = float(gm.stds[k])
        assert (xk.mean(0) - gm.means[k]).abs().max() < 5 * s / math.sqrt(w * n) + 0.02
        var = ((xk - xk.mean(0)) ** 2).sum(1).mean() / gm.dof  # dof = (4 - 1) * 3 = 9
        assert abs(float(var / s**2) - 1) < 5 * math.sqrt(2 / (w * n * gm.dof)) + 0.1


@pytest.mark.parametrize("schedule", ["vp_linear", "edm_poly", "sigmoid", "karras", "flow"])
@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_second_order_samplers_on_every_schedule(schedule: str, name: str) -> None:
    gm = _mixture_2d()
    _check_mixture(_run(name, gm, schedule=schedule, seed=2), gm)


def _trajectory_error(name: str, steps: int, x: torch.Tensor, ref: torch.Tensor, gm: GaussianMixture) -> float:
    sch = get_schedule("cosine")
    ts = make_grid(sch, steps, "karras")
    out = get_sampler(name)(gm.denoiser(sch), x, ts, sch)
    return float(((out - ref) ** 2).mean().sqrt())


def test_ode_convergence_and_second_order_beats_euler() -> None:
    """Error against a 1000-step Heun solution of the same probability-flow ODE, from the same x_T (Karras grid).

    At 10 NFE Heun's trapezoid over sigma ratios of 5-15 per step is worse than Euler (as in EDM, which
    uses >= 18 steps); from 20 NFE on both 2nd-order solvers must beat Euler.
    """
    gm = _mixture_2d()
    sch = get_schedule("cosine")
    g = torch.Generator().manual_seed(7)
    ts_ref = make_grid(sch, 1000, "karras")
    x = prior(sch, ts_ref[0], torch.zeros(500, 2, dtype=torch.float64), None, g)
    ref = get_sampler("heun")(gm.denoiser(sch), x, ts_ref, sch)
    errors: dict[str, list[float]] = {}
    for name in ("euler", "ddim", "heun", "dpmpp_2m"):
        errors[name] = []
        for budget in (10, 20, 40, 80):
            steps = (budget + 1) // 2 if name == "heun" else budget
            errors[name].append(_trajectory_error(name, steps, x, ref, gm))
        assert all(b < a for a, b in zip(errors[name], errors[name][1:])), f"{name}: {errors[name]}"
    for i in range(1, 4):  # equal NFE: 20, 40, 80
        assert errors["heun"][i] < errors["euler"][i]
        assert errors["dpmpp_2m"][i] < errors["euler"][i]
    # second order: at 80 NFE the error shrinks much faster than first-order Euler's
    assert errors["dpmpp_2m"][-1] < 0.25 * errors["euler"][-1]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_bit_identical(name: str) -> None:
    gm = _mixture_2d()
    sch = get_schedule("cosine")
    ts = make_grid(sch, 15, "karras")

    def once() -> torch.Tensor:
        g = torch.Generator().manual_seed(11)
        x = prior(sch, ts[0], torch.zeros(64, 2), None, g)
        return get_sampler(name)(gm.denoiser(sch), x, ts, sch, generator=g)

    a, b = once(), once()
    assert torch.equal(a, b)


def test_no_state_leaks_between_calls_of_different_batch_size() -> None:
    """diffusers #6631/#8711: a multistep solver must not carry history from one call into the next."""
    gm = _mixture_2d()
    sch = get_schedule("cosine")
    ts = make_grid(sch, 12, "karras")
    g = torch.Generator().manual_seed(0)
    xa = prior(sch, ts[0], torch.zeros(8, 2, dtype=torch.float64), None, g)
    xb = prior(sch, ts[0], torch.zeros(3, 2, dtype=torch.float64), None, g)
    for name in ("dpmpp_2m", "heun", "ddim"):
        fn = get_sampler(name)
        first = fn(gm.denoiser(sch), xa, ts, sch)
        fn(gm.denoiser(sch), xb, make_grid(sch, 5, "logsnr"), sch)
        again = fn(gm.denoiser(sch), xa, ts, sch)
        assert torch.equal(first, again)


def test_callback_and_nfe_counts() -> None:
    gm = _mixture_1d()
    sch = get_schedule("cosine")
    for name in (n for n in SAMPLERS if n != "adaptive"):  # adaptive picks its own steps: tests/test_adaptive.py
        calls = 0
        seen: list[StepInfo] = []

        def den(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return gm.denoiser(sch)(x, t)

        ts = make_grid(sch, 9, "karras")
        x = prior(sch, ts[0], torch.zeros(16, 1), None, torch.Generator().manual_seed(0))
        get_sampler(name)(den, x, ts, sch, generator=torch.Generator().manual_seed(1), callback=seen.append)
        assert calls == nfe(name, 9), name
        assert [s.i for s in seen] == list(range(9)) and seen[-1].t == 0.0


def test_sample_convenience_and_flow_starts_at_pure_noise() -> None:
    gm = _mixture_1d()
    sch = get_schedule("flow")
    out = sample(gm.denoiser(sch), torch.zeros(N, 1, dtype=torch.float64), sch, sampler="dpmpp_2m", steps=60,
                 grid="uniform", generator=torch.Generator().manual_seed(5))
    _check_mixture(out, gm)


# --- bad input -------------------------------------------------------------------------------------


def _den(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def test_non_monotone_grid_is_rejected() -> None:
    sch = get_schedule("cosine")
    with pytest.raises(ValueError, match=r"strictly decreasing.*ts\[1\]"):
        get_sampler("heun")(_den, torch.zeros(4, 2), torch.tensor([1.0, 0.5, 0.7, 0.0]), sch)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_sampler("ddim")(_den, torch.zeros(4, 2), torch.tensor([1.5, 0.5, 0.0]), sch)
    with pytest.raises(ValueError, match="1-D grid"):
        get_sampler("ddim")(_den, torch.zeros(4, 2), torch.tensor([1.0]), sch)


def test_unknown_sampler_name() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*dpmpp_2m"):
        get_sampler("dpm")


def test_nan_from_denoiser_is_reported_with_step() -> None:
    sch = get_schedule("cosine")
    ts = make_grid(sch, 5)

    def bad(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float("nan")) if float(t) < 0.9 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match=r"NaN or inf at step \d"):
        get_sampler("dpmpp_2m")(bad, torch.randn(4, 2), ts, sch)


def test_wrong_shapes_are_rejected() -> None:
    sch = get_schedule("cosine")
    ts = make_grid(sch, 5)
    space = ZeroCoM(torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"x: expected node rows of shape \[N=4, D\]"):
        get_sampler("ddim")(_den, torch.zeros(5, 3), ts, sch, space)
    with pytest.raises(ValueError, match="denoise returned"):
        get_sampler("ddim")(lambda x, t: x[:1], torch.zeros(4, 3), ts, sch)
    with pytest.raises(ValueError, match="floating-point"):
        get_sampler("ddim")(_den, torch.zeros(4, 3, dtype=torch.long), ts, sch)


def test_euler_maruyama_refuses_alpha_zero_start() -> None:
    sch = get_schedule("flow")
    ts = make_grid(sch, 5, "uniform")  # starts at t = 1 where alpha = 0
    with pytest.raises(ValueError, match="alpha"):
        get_sampler("euler_maruyama")(_den, torch.zeros(4, 2), ts, sch)


def test_heun_churn_interval_is_in_t_and_the_old_sigma_keys_are_refused() -> None:
    """churn_interval=(lo, hi) churns at grid times lo < t <= hi, like guidance_interval; EDM's S_tmin / S_tmax
    (sigma_ve units, the former churn_min / churn_max) are refused with the conversion to use."""
    gm, sch = _mixture_1d(), get_schedule("cosine")
    ts = make_grid(sch, 12, "karras")
    x = torch.randn(256, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heun = get_sampler("heun")

    def run(**opts: object) -> torch.Tensor:
        return heun(gm.denoiser(sch), x.clone(), ts, sch, generator=torch.Generator().manual_seed(1), **opts)

    plain, churned = run(), run(churn=2.0)
    assert not torch.equal(plain, churned)
    assert torch.equal(run(churn=2.0, churn_interval=(0.0, 1.0)), churned)  # every grid time t is in (0, 1]
    below_grid = float(ts[ts > 0].min()) / 2
    assert torch.equal(run(churn=2.0, churn_interval=(0.0, below_grid)), plain)  # no grid time in the interval
    partly = run(churn=2.0, churn_interval=(float(ts[6]), 1.0))
    assert not torch.equal(partly, plain) and not torch.equal(partly, churned)
    with pytest.raises(TypeError, match=r"churn_interval=\(t_lo, t_hi\) in t"):
        run(churn=2.0, churn_min=0.05, churn_max=50.0)
    with pytest.raises(ValueError, match="churn_interval"):
        run(churn=2.0, churn_interval=(0.5, 0.2))
