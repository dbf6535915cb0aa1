"""Samplers: pure functions ``sampler(denoise, x, ts, schedule, space, *, generator, callback, **opts) -> x0``.

``denoise(x, t)`` returns the x0 estimate ("denoised") of the native state x_t = alpha(t) x0 + sigma(t) eps;
``t`` is a 0-dim float64 tensor. ``ts`` is a strictly decreasing grid of times from
``schedule`` (see ``multidiff.schedules.make_grid``). Updates are written in the native (alpha, sigma)
coordinates through ratios, so they stay finite where alpha(t) = 0 (the flow schedule at t = 1).
Nothing survives a call: no step counters, no solver history (cf. diffusers #6631, #8711).
Categorical parts of the space (``multidiff.spaces.Categorical``) take the discrete jump of ``multidiff.categorical``
in every sampler instead of the continuous update; the continuous parts are untouched by it.
``adaptive`` uses only the grid's end points and picks its own steps for a tolerance (its NFE: ``StepInfo.nfe`` and
the ``stats`` dict it fills).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .categorical import jump, kappa
from .kernels import Kernel
from .schedules import Schedule, get_schedule, make_grid
from .spaces import Euclidean, Space

__all__ = [
    "DenoiseFn",
    "StepInfo",
    "SAMPLERS",
    "get_sampler",
    "sample_ancestral",
    "sample_ddim",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_adaptive",
    "prior",
    "sample",
    "nfe",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback sees after each step (``adaptive``: ``steps`` = accepted steps so far, ``nfe`` = the
    denoiser evaluations spent so far; other samplers leave ``nfe`` None, see ``nfe()``)."""

    i: int
    steps: int
    t: float
    x: Tensor
    denoised: Tensor
    nfe: int | None = None


Callback = Callable[[StepInfo], None]


class Sampler(Protocol):
    def __call__(
        self,
        denoise: DenoiseFn,
        x: Tensor,
        ts: Tensor,
        schedule: Schedule,
        space: Space | None = None,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> Tensor: ...


class _Run:
    """Shared per-call bookkeeping: validated grid, schedule coefficients as float64, checked denoiser calls."""

    def __init__(self, denoise: DenoiseFn, x: Tensor, ts: Tensor, schedule: Schedule, space: Space | None) -> None:
        if not callable(denoise):
            raise TypeError(f"denoise: expected a callable (x, t) -> denoised, got {type(denoise).__name__}")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a multidiff.schedules.Schedule, got {type(schedule).__name__}")
        ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
        if ts.ndim != 1 or ts.numel() < 2:
            raise ValueError(f"ts: expected a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
        if not torch.isfinite(ts).all() or ts.min() < 0 or ts.max() > 1:
            raise ValueError(f"ts: times must lie in [0, 1], got range [{ts.min().item():.4g}, {ts.max().item():.4g}]")
        diffs = ts[1:] - ts[:-1]
        if not (diffs < 0).all():
            bad = int(torch.nonzero(diffs >= 0)[0])
            raise ValueError(
                f"ts: the step grid must be strictly decreasing (noise -> data); ts[{bad}]={ts[bad].item():.6g} "
                f"is followed by ts[{bad + 1}]={ts[bad + 1].item():.6g}"
            )
        self.space = space if space is not None else Euclidean()
        self.space.check(x)
        if not torch.isfinite(x).all():
            raise ValueError("x: the initial state contains NaN or inf")
        self.denoise_fn = denoise
        self.ts = ts
        self.alpha = schedule.alpha(ts).tolist()
        self.sigma = schedule.sigma(ts).tolist()
        self.schedule = schedule
        self.steps = ts.numel() - 1
        self.discrete = self.space.discrete_parts()
        self.kappa = kappa(schedule, ts).tolist() if self.discrete else []

    def t(self, i: int) -> Tensor:
        return self.ts[i].clone()

    def denoise(self, x: Tensor, t: Tensor, i: int) -> Tensor:
        denoised = self.denoise_fn(x, t)
        if not isinstance(denoised, Tensor) or denoised.shape != x.shape:
            raise ValueError(
                f"denoise returned {tuple(denoised.shape) if isinstance(denoised, Tensor) else type(denoised).__name__}, "
                f"expected a tensor shaped like x {tuple(x.shape)}"
            )
        if not torch.isfinite(denoised).all():
            raise FloatingPointError(f"denoise returned NaN or inf at step {i} (t={float(t):.6g}); the sampler stopped")
        return self.space.project(denoised.to(x.dtype))

    def eps(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        """eps_hat = (x - alpha denoised) / sigma at grid point i."""
        return (x - self.alpha[i] * denoised) / self.sigma[i]

    def noise(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.space.randn_like(x, generator)

    def advance(self, x_new: Tensor, x: Tensor, denoised: Tensor, i: int, generator: torch.Generator | None) -> Tensor:
        """Categorical parts of ``x_new`` replaced by the discrete jump from ``x`` at grid point i to i + 1."""
        if not self.discrete:
            return x_new
        x_new = x_new.clone()
        for sl, part in self.discrete:
            x_new[..., sl] = jump(x[..., sl], denoised[..., sl], self.kappa[i], self.kappa[i + 1], generator, part.batch)
        return x_new

    def keep_discrete(self, x_new: Tensor, source: Tensor) -> Tensor:
        """Categorical parts of ``x_new`` copied from ``source`` (after a continuous-only correction or churn)."""
        if not self.discrete:
            return x_new
        x_new = x_new.clone()
        for sl, _ in self.discrete:
            x_new[..., sl] = source[..., sl]
        return x_new


def _ddim_coefficients(a_t: float, s_t: float, a_s: float, s_s: float, eta: float) -> tuple[float, float]:
    """(weight of eps_hat, std of fresh noise) of a DDIM step t -> s; eta = 1 is the DDPM posterior std."""
    # posterior std in native coordinates: eta * sigma_s * sqrt(1 - exp(logsnr_t - logsnr_s))
    ratio = (a_t * s_s) / (s_t * a_s) if a_s > 0 else 0.0
    c = eta * s_s * math.sqrt(max(0.0, 1.0 - ratio**2))
    return math.sqrt(max(0.0, s_s**2 - c**2)), c


def _emit(callback: Callback | None, run: _Run, i: int, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(StepInfo(i=i, steps=run.steps, t=float(run.ts[i + 1]), x=x, denoised=denoised))


def sample_ddim(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM's ancestral sampler."""
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    run = _Run(denoise, x, ts, schedule, space)
    for i in range(run.steps):
        denoised = run.denoise(x, run.t(i), i)
        eps = run.eps(x, denoised, i)
        w_eps, c = _ddim_coefficients(run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1], eta)
        x_new = run.alpha[i + 1] * denoised + w_eps * eps
        if c > 0:
            x_new = x_new + c * run.noise(x_new, generator)
        x = run.advance(x_new, x, denoised, i, generator)
        _emit(callback, run, i, x, denoised)
    return x


def sample_ancestral(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): draw x_s ~ q(x_s | x_t, x0 = denoised)."""
    return sample_ddim(denoise, x, ts, schedule, space, generator=generator, callback=callback, eta=1.0)


def sample_euler(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat (Song et al. 2021) in time t."""
    run = _Run(denoise, x, ts, schedule, space)
    da, ds = schedule.derivatives(run.ts)
    da, ds = da.tolist(), ds.tolist()
    for i in range(run.steps):
        denoised = run.denoise(x, run.t(i), i)
        dt = float(run.ts[i + 1] - run.ts[i])
        x = run.advance(x + dt * (da[i] * denoised + ds[i] * run.eps(x, denoised, i)), x, denoised, i, generator)
        _emit(callback, run, i, x, denoised)
    return x


def sample_euler_maruyama(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE dx = [f x - g^2 score] dt + g dW (Song et al. 2021, eq. 6); last step noise-free."""
    run = _Run(denoise, x, ts, schedule, space)
    da, ds = schedule.derivatives(run.ts)
    da, ds = da.tolist(), ds.tolist()
    for i in range(run.steps):
        a, s = run.alpha[i], run.sigma[i]
        if a <= 0:
            raise ValueError(
                f"ts: Euler–Maruyama needs alpha(t) > 0 (a finite diffusion coefficient), but alpha(ts[{i}]) = 0; "
                f"start the grid below t = {float(run.ts[i]):.4g} (e.g. the 'karras' grid)"
            )
        g2 = 2 * s * ds[i] - 2 * (da[i] / a) * s**2  # g(t)^2 = d sigma^2/dt - 2 f sigma^2, f = alpha'/alpha
        denoised = run.denoise(x, run.t(i), i)
        eps = run.eps(x, denoised, i)
        dt = float(run.ts[i + 1] - run.ts[i])  # negative
        # reverse drift = probability-flow drift - (g^2/2) score, score = -eps/sigma
        x_new = x + dt * (da[i] * denoised + ds[i] * eps + 0.5 * g2 * eps / s)
        if i < run.steps - 1:
            x_new = x_new + math.sqrt(max(g2, 0.0) * -dt) * run.noise(x_new, generator)
        x = run.advance(x_new, x, denoised, i, generator)
        _emit(callback, run, i, x, denoised)
    return x


def sample_heun(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    churn: float = 0.0,
    churn_interval: tuple[float, float] | None = None,
    noise_scale: float = 1.0,
    churn_min: float | None = None,
    churn_max: float | None = None,
) -> Tensor:
    """Heun's 2nd-order method in sigma_ve = sigma/alpha (Karras et al. 2022, Algorithm 2, with optional S_churn).

    ``churn_interval=(lo, hi)``: churn only at grid times lo < t <= hi (in t, like the grids and
    ``guidance_interval``; EDM's S_tmin / S_tmax are sigma_ve values, convert with ``schedule.t_from_sigma_ve``);
    None churns at every step."""
    if churn_min is not None or churn_max is not None:
        raise TypeError("sample_heun: churn_min / churn_max (EDM's S_tmin / S_tmax in sigma_ve units) were replaced by "
                        "churn_interval=(t_lo, t_hi) in t, like the grids and guidance_interval; convert sigma_ve "
                        "bounds with schedule.t_from_sigma_ve")
    if churn < 0:
        raise ValueError(f"churn: expected >= 0, got {churn}")
    if churn_interval is not None:
        lo, hi = (float(v) for v in churn_interval)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"churn_interval: expected (lo, hi) with 0 <= lo < hi <= 1 in t, got {churn_interval}")
    run = _Run(denoise, x, ts, schedule, space)
    for i in range(run.steps):
        t, a_t, s_t = run.t(i), run.alpha[i], run.sigma[i]
        a_s, s_s = run.alpha[i + 1], run.sigma[i + 1]
        sve = s_t / a_t if a_t > 0 else math.inf
        in_interval = churn_interval is None or lo < float(t) <= hi
        gamma = min(churn / run.steps, math.sqrt(2) - 1) if churn > 0 and in_interval else 0.0
        if gamma > 0 and math.isfinite(sve):
            # raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise (lines 4-6)
            s_top = float(schedule.sigma_ve(torch.tensor(1.0, dtype=torch.float64)))
            sve_hat = min(sve * (1 + gamma), s_top)
            t = schedule.t_from_sigma_ve(torch.tensor(sve_hat, dtype=torch.float64)).clamp(0.0, 1.0)
            a_hat = float(schedule.alpha(t))
            z = x / a_t + math.sqrt(max(sve_hat**2 - sve**2, 0.0)) * noise_scale * run.noise(x, generator)
            x, a_t, s_t, sve = run.keep_discrete(a_hat * z, x), a_hat, a_hat * sve_hat, sve_hat
        denoised = run.denoise(x, t, i)
        eps = (x - a_t * denoised) / s_t
        # Euler step in sigma_ve, in native coordinates
        x_next = run.advance(a_s * denoised + s_s * eps, x, denoised, i, generator)
        if s_s > 0 and math.isfinite(sve):
            denoised2 = run.denoise(x_next, run.t(i + 1), i)
            eps2 = (x_next - a_s * denoised2) / s_s
            # trapezoid: z_s = z + (sve_s - sve) (eps + eps2) / 2, i.e. Euler plus a_s (sve_s - sve)(eps2 - eps) / 2
            x_next = run.keep_discrete(x_next + 0.5 * (s_s - a_s * sve) * (eps2 - eps), x_next)
        x = x_next
        _emit(callback, run, i, x, denoised)
    return x


def sample_dpmpp_2m(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), the multistep 2nd-order data-prediction solver (Lu et al. 2022, Algorithm 2)."""
    run = _Run(denoise, x, ts, schedule, space)
    lam = [0.5 * l for l in schedule.logsnr(run.ts).tolist()]  # lambda = log(alpha / sigma)
    denoised_prev: Tensor | None = None
    h_prev = math.nan
    for i in range(run.steps):
        denoised = run.denoise(x, run.t(i), i)
        a_t, s_t, a_s, s_s = run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1]
        h = lam[i + 1] - lam[i]
        if denoised_prev is None or s_s == 0 or not math.isfinite(h) or not math.isfinite(h_prev):
            denoised_corr = denoised  # first step, last step (to sigma = 0) and unbounded steps are first order
        else:
            r = h_prev / h
            denoised_corr = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * denoised_prev
        # x_s = (sigma_s/sigma_t) x_t - alpha_s (exp(-h) - 1) d_corr, with alpha_s exp(-h) = sigma_s alpha_t / sigma_t
        x = run.advance((s_s / s_t) * x + (a_s - s_s * a_t / s_t) * denoised_corr, x, denoised, i, generator)
        denoised_prev, h_prev = denoised, h
        _emit(callback, run, i, x, denoised)
    return x


def sample_adaptive(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    space: Space | None = None,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    rtol: float = 0.003,
    atol: float = 0.003,
    h_init: float = 0.5,
    max_nfe: int = 2000,
    stats: dict[str, int] | None = None,
) -> Tensor:
    """Adaptive DPM-Solver-23 (Lu et al. 2022, Sec. 3.3) in data-prediction form: each step a 3rd-order singlestep
    exponential-integrator solution (r1 = 1/3, r2 = 2/3) and an embedded 2nd-order one from the same 3 denoiser calls;
    the step in lambda = log(alpha/sigma) is accepted when their difference meets ``rtol``/``atol`` and resized by
    0.9 (1/E)^(1/3), from ts[0] to the grid's last time with sigma > 0, then the denoised value at sigma = 0.

    With z = x / alpha and h = lambda_s - lambda_t, z_s = e^-h z_t + int_0^h e^-(h-v) denoised(lambda_t + v) dv; the
    linear part is exact, so steps are long where the denoised value barely moves (high noise). E is, for the worst
    sample, the RMS over its continuous entries of (z_3rd - z_2nd) / (atol + rtol max(|z_t|, |z_3rd|)); steps are
    shared by the batch, so a sample's path depends on its batch-mates within the tolerance. Categorical parts stay
    fixed within a step and take the jump from its start to its end with the denoised probabilities at its start.
    ``stats`` (a dict) receives ``nfe``, ``accepted`` and ``rejected``; ``StepInfo.nfe`` the running NFE.
    """
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
        raise ValueError(f"rtol, atol: expected >= 0 and not both 0, got rtol={rtol}, atol={atol}")
    if not h_init > 0 or max_nfe < 1:
        raise ValueError(f"h_init, max_nfe: expected > 0 and >= 1, got {h_init}, {max_nfe}")
    run = _Run(denoise, x, ts, schedule, space)
    counts = {"nfe": 0, "accepted": 0, "rejected": 0}
    disc = run.discrete
    end = run.steps if run.sigma[-1] > 0 else run.steps - 1  # last grid point with sigma > 0
    t_of = lambda lam: schedule.t_from_logsnr(torch.tensor(2 * lam, dtype=torch.float64)).clamp(0.0, 1.0)  # noqa: E731

    def native(z: Tensor, t: Tensor) -> Tensor:
        """x = alpha z on the continuous parts; categorical parts are kept unscaled."""
        x_n = float(schedule.alpha(t)) * z
        for sl, _ in disc:
            x_n[..., sl] = z[..., sl]
        return x_n

    def den(z: Tensor, t: Tensor) -> Tensor:
        counts["nfe"] += 1
        if counts["nfe"] > max_nfe:
            raise FloatingPointError(f"adaptive: more than max_nfe={max_nfe} denoiser evaluations at t={float(t):.4g} "
                                     f"(rtol={rtol}, atol={atol}); raise the tolerance or max_nfe")
        return run.denoise(native(z, t), t, counts["accepted"])

    def report(t: float, x_now: Tensor, denoised: Tensor) -> None:
        if stats is not None:
            stats.clear()
            stats.update(counts)
        if callback is not None:
            callback(StepInfo(i=counts["accepted"] - 1, steps=counts["accepted"], t=t, x=x_now, denoised=denoised,
                              nfe=counts["nfe"]))

    start = 0
    if run.alpha[0] <= 0:  # alpha = 0 (flow at t = 1): one DDIM step to ts[1], as every sampler's first step there
        denoised = den(x, run.t(0))
        x = run.advance(run.alpha[1] * denoised + run.sigma[1] * run.eps(x, denoised, 0), x, denoised, 0, generator)
        counts["accepted"] += 1
        start = 1
        report(float(run.ts[1]), x, denoised)
    z = x / run.alpha[start]
    for sl, _ in disc:
        z[..., sl] = x[..., sl]
    lam = 0.5 * float(schedule.logsnr(run.ts[start]))
    lam_end = 0.5 * float(schedule.logsnr(run.ts[end]))
    t = run.t(start)
    denoised: Tensor | None = None
    h = h_init
    r1, r2 = 1 / 3, 2 / 3
    while start < end and lam < lam_end:
        if denoised is None:
            denoised = den(z, t)
        last = h >= lam_end - lam
        h = lam_end - lam if last else h
        t1, t2 = t_of(lam + r1 * h), t_of(lam + r2 * h)
        t_s = run.t(end) if last else t_of(lam + h)

        def phi(step: float) -> tuple[float, float, float]:
            """(e^-step, I0 = 1 - e^-step, I1 = step - I0): the exponential integrals of the data-prediction update."""
            i0 = -math.expm1(-step)
            return math.exp(-step), i0, step - i0

        e1, a1, _ = phi(r1 * h)
        z1 = e1 * z + a1 * denoised
        denoised1 = den(z1, t1)
        e2, a2, b2 = phi(r2 * h)
        z2 = e2 * z + a2 * denoised + (b2 / (r1 * h)) * (denoised1 - denoised)
        denoised2 = den(z2, t2)
        e, a0, b0 = phi(h)
        z_high = e * z + a0 * denoised + (b0 / (r2 * h)) * (denoised2 - denoised)  # DPM-Solver-3
        # z_high - z_low, z_low: DPM-Solver-2 (r1) from denoised1
        err = (b0 / h) * ((denoised2 - denoised) / r2 - (denoised1 - denoised) / r1)
        for sl, _ in disc:
            z_high[..., sl] = z[..., sl]
            err[..., sl] = 0
        scale = atol + rtol * torch.maximum(z.abs(), z_high.abs())
        ratio = run.space.continuous_mean_per_sample((err / scale) ** 2).sqrt()
        big = float(ratio.max()) if ratio.numel() else 0.0
        if not math.isfinite(big):
            raise FloatingPointError(f"adaptive: non-finite error estimate at t={float(t):.4g}")
        if big <= 1.0:
            if disc:
                k_t, k_s = float(kappa(schedule, t)), float(kappa(schedule, t_s))
                for sl, part in disc:
                    z_high[..., sl] = jump(z[..., sl], denoised[..., sl], k_t, k_s, generator, part.batch)
            z, lam, t, denoised_start, denoised = z_high, lam_end if last else lam + h, t_s, denoised, None
            counts["accepted"] += 1
            report(float(t), native(z, t), denoised_start)
        else:
            counts["rejected"] += 1
        # the embedded estimate is 2nd order: error ~ h^3
        h = h * min(5.0, max(0.2, 0.9 * (1.0 / max(big, 1e-10)) ** (1 / 3)))
    x = native(z, t)
    if end < run.steps:  # sigma = 0 at the grid's end: the denoised value, categorical parts to their argmax
        denoised = den(z, t) if denoised is None else denoised
        x = run.advance(denoised.clone(), x, denoised, end, generator)
        counts["accepted"] += 1
        report(0.0, x, denoised)
    elif stats is not None:
        stats.clear()
        stats.update(counts)
    return x


SAMPLERS: dict[str, Sampler] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_maruyama": sample_euler_maruyama,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "adaptive": sample_adaptive,
}


def get_sampler(name: str) -> Sampler:
    """Sampler by name: 'ancestral', 'ddim', 'euler', 'euler_maruyama', 'heun', 'dpmpp_2m', 'adaptive'."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None


def nfe(sampler: str, steps: int) -> int:
    """Denoiser evaluations a sampler spends on ``steps`` grid intervals (Heun skips its correction on the last one)."""
    get_sampler(sampler)
    if sampler == "adaptive":
        raise ValueError("sampler 'adaptive' picks its own steps: read its NFE from StepInfo.nfe or its stats dict")
    return 2 * steps - 1 if sampler == "heun" else steps


def prior(
    schedule: Schedule,
    t: float | Tensor,
    like: Tensor,
    space: Space | None = None,
    generator: torch.Generator | None = None,
    kernel: Kernel | None = None,
) -> Tensor:
    """x_T = sigma(t) n, n ~ the kernel's noise on the space (default N(0, I); PFGM++: its prior at r_max =
    sigma_max sqrt(D)), uniform classes for categorical parts: the terminal distribution when alpha(t) x0 is negligible."""
    space = space if space is not None else Euclidean()
    s = float(schedule.sigma(torch.as_tensor(t, dtype=torch.float64)))
    noise = (kernel or Kernel()).noise(like, space, generator)
    x = s * noise
    for sl, _ in space.discrete_parts():  # categorical parts start from uniformly random classes, unscaled
        x[..., sl] = noise[..., sl]
    return x


def sample(
    denoise: DenoiseFn,
    like: Tensor,
    schedule: Schedule | str = "cosine",
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    grid: str = "karras",
    space: Space | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    kernel: Kernel | None = None,
    **opts: float,
) -> Tensor:
    """Draw samples shaped like ``like``: build the grid, draw the prior (of ``kernel``) on the space, run the sampler."""
    schedule = get_schedule(schedule)
    fn = get_sampler(sampler)
    if kernel is not None:
        kernel.check_sampler(sampler, opts)
    ts = make_grid(schedule, steps, grid)
    x = prior(schedule, ts[0], like, space, generator, kernel)
    return fn(denoise, x, ts, schedule, space, generator=generator, callback=callback, **opts)
