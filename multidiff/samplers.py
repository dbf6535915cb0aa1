"""Samplers: pure functions ``sampler(denoise, x, ts, schedule, space, *, generator, callback, **opts) -> x0``.

``denoise(x, t)`` returns the x0 estimate ("denoised") of the native state x_t = alpha(t) x0 + sigma(t) eps;
``t`` is a 0-dim float64 tensor. ``ts`` is a strictly decreasing grid of times from
``schedule`` (see ``multidiff.schedules.make_grid``). Updates are written in the native (alpha, sigma)
coordinates through ratios, so they stay finite where alpha(t) = 0 (the flow schedule at t = 1).
Nothing survives a call: no step counters, no solver history (cf. diffusers #6631, #8711).
Categorical parts of the space (``multidiff.spaces.Categorical``) take the discrete jump of ``multidiff.categorical``
in every sampler instead of the continuous update; the continuous parts are untouched by it.
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
    "prior",
    "sample",
    "nfe",
]

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback sees after each step."""

    i: int
    steps: int
    t: float
    x: Tensor
    denoised: Tensor


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
        d = self.denoise_fn(x, t)
        if not isinstance(d, Tensor) or d.shape != x.shape:
            raise ValueError(
                f"denoise returned {tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__}, "
                f"expected a tensor shaped like x {tuple(x.shape)}"
            )
        if not torch.isfinite(d).all():
            raise FloatingPointError(f"denoise returned NaN or inf at step {i} (t={float(t):.6g}); the sampler stopped")
        return self.space.project(d.to(x.dtype))

    def eps(self, x: Tensor, d: Tensor, i: int) -> Tensor:
        """eps_hat = (x - alpha d) / sigma at grid point i."""
        return (x - self.alpha[i] * d) / self.sigma[i]

    def noise(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.space.randn_like(x, generator)

    def advance(self, x_new: Tensor, x: Tensor, d: Tensor, i: int, generator: torch.Generator | None) -> Tensor:
        """Categorical parts of ``x_new`` replaced by the discrete jump from ``x`` at grid point i to i + 1."""
        if not self.discrete:
            return x_new
        x_new = x_new.clone()
        for sl, part in self.discrete:
            x_new[..., sl] = jump(x[..., sl], d[..., sl], self.kappa[i], self.kappa[i + 1], generator, part.batch)
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


def _emit(callback: Callback | None, run: _Run, i: int, x: Tensor, d: Tensor) -> None:
    if callback is not None:
        callback(StepInfo(i=i, steps=run.steps, t=float(run.ts[i + 1]), x=x, denoised=d))


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
        d = run.denoise(x, run.t(i), i)
        eps = run.eps(x, d, i)
        w_eps, c = _ddim_coefficients(run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1], eta)
        x_new = run.alpha[i + 1] * d + w_eps * eps
        if c > 0:
            x_new = x_new + c * run.noise(x_new, generator)
        x = run.advance(x_new, x, d, i, generator)
        _emit(callback, run, i, x, d)
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
        d = run.denoise(x, run.t(i), i)
        dt = float(run.ts[i + 1] - run.ts[i])
        x = run.advance(x + dt * (da[i] * d + ds[i] * run.eps(x, d, i)), x, d, i, generator)
        _emit(callback, run, i, x, d)
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
        d = run.denoise(x, run.t(i), i)
        eps = run.eps(x, d, i)
        dt = float(run.ts[i + 1] - run.ts[i])  # negative
        # reverse drift = probability-flow drift - (g^2/2) score, score = -eps/sigma
        x_new = x + dt * (da[i] * d + ds[i] * eps + 0.5 * g2 * eps / s)
        if i < run.steps - 1:
            x_new = x_new + math.sqrt(max(g2, 0.0) * -dt) * run.noise(x_new, generator)
        x = run.advance(x_new, x, d, i, generator)
        _emit(callback, run, i, x, d)
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
    churn_min: float = 0.0,
    churn_max: float = math.inf,
    noise_scale: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method in sigma = sigma/alpha (Karras et al. 2022, Algorithm 2, with optional S_churn)."""
    if churn < 0:
        raise ValueError(f"churn: expected >= 0, got {churn}")
    run = _Run(denoise, x, ts, schedule, space)
    for i in range(run.steps):
        t, a_t, s_t = run.t(i), run.alpha[i], run.sigma[i]
        a_s, s_s = run.alpha[i + 1], run.sigma[i + 1]
        sve = s_t / a_t if a_t > 0 else math.inf
        gamma = min(churn / run.steps, math.sqrt(2) - 1) if churn > 0 and churn_min <= sve <= churn_max else 0.0
        if gamma > 0 and math.isfinite(sve):
            # raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise (lines 4-6)
            s_top = float(schedule.sigma_ve(torch.tensor(1.0, dtype=torch.float64)))
            sve_hat = min(sve * (1 + gamma), s_top)
            t = schedule.t_from_sigma_ve(torch.tensor(sve_hat, dtype=torch.float64)).clamp(0.0, 1.0)
            a_hat = float(schedule.alpha(t))
            z = x / a_t + math.sqrt(max(sve_hat**2 - sve**2, 0.0)) * noise_scale * run.noise(x, generator)
            x, a_t, s_t, sve = run.keep_discrete(a_hat * z, x), a_hat, a_hat * sve_hat, sve_hat
        d = run.denoise(x, t, i)
        eps = (x - a_t * d) / s_t
        x_next = run.advance(a_s * d + s_s * eps, x, d, i, generator)  # Euler step in sigma_ve, native coordinates
        if s_s > 0 and math.isfinite(sve):
            d2 = run.denoise(x_next, run.t(i + 1), i)
            eps2 = (x_next - a_s * d2) / s_s
            # trapezoid: z_s = z + (sve_s - sve) (eps + eps2) / 2, i.e. Euler plus a_s (sve_s - sve)(eps2 - eps) / 2
            x_next = run.keep_discrete(x_next + 0.5 * (s_s - a_s * sve) * (eps2 - eps), x_next)
        x = x_next
        _emit(callback, run, i, x, d)
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
    d_prev: Tensor | None = None
    h_prev = math.nan
    for i in range(run.steps):
        d = run.denoise(x, run.t(i), i)
        a_t, s_t, a_s, s_s = run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1]
        h = lam[i + 1] - lam[i]
        if d_prev is None or s_s == 0 or not math.isfinite(h) or not math.isfinite(h_prev):
            d_corr = d  # first step, last step (to sigma = 0) and unbounded steps are first order
        else:
            r = h_prev / h
            d_corr = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        # x_s = (sigma_s/sigma_t) x_t - alpha_s (exp(-h) - 1) d_corr, with alpha_s exp(-h) = sigma_s alpha_t / sigma_t
        x = run.advance((s_s / s_t) * x + (a_s - s_s * a_t / s_t) * d_corr, x, d, i, generator)
        d_prev, h_prev = d, h
        _emit(callback, run, i, x, d)
    return x


SAMPLERS: dict[str, Sampler] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_maruyama": sample_euler_maruyama,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Sampler:
    """Sampler by name: 'ancestral', 'ddim', 'euler', 'euler_maruyama', 'heun', 'dpmpp_2m'."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None


def nfe(sampler: str, steps: int) -> int:
    """Denoiser evaluations a sampler spends on ``steps`` grid intervals (Heun skips its correction on the last one)."""
    get_sampler(sampler)
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
