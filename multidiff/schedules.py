"""Noise schedules in continuous time t in [0, 1]: x_t = alpha(t) * x_0 + sigma(t) * eps.

Every schedule exposes ``alpha``, ``sigma``, ``logsnr`` = log(alpha^2 / sigma^2) and the inverse
``t_from_logsnr``; samplers only ever need these. Time runs from data (t=0) to noise (t=1).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VPSchedule",
    "VPLinear",
    "Cosine",
    "EDMPolynomial",
    "Sigmoid",
    "Karras",
    "Flow",
    "SCHEDULES",
    "get_schedule",
    "append_dims",
    "GRIDS",
    "make_grid",
    "grid_uniform_t",
    "grid_uniform_logsnr",
    "grid_karras",
]


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``x`` broadcasts against a tensor with ``ndim`` dims."""
    if x.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {x.ndim} dims, more than the target {ndim}")
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _as_tensor(t: Tensor | float) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.float64)


class Schedule(ABC):
    """A diffusion x_t = alpha(t) x0 + sigma(t) eps on t in [0, 1] (Kingma et al. 2021, VDM)."""

    name: str = "schedule"

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t)."""

    def logsnr(self, t: Tensor) -> Tensor:
        """log(alpha^2 / sigma^2), strictly decreasing in t."""
        t = _as_tensor(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    @abstractmethod
    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """Inverse of ``logsnr``."""

    def sigma_ve(self, t: Tensor) -> Tensor:
        """The variance-exploding noise level sigma/alpha = exp(-logsnr/2) (EDM's sigma)."""
        t = _as_tensor(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, sigma: Tensor) -> Tensor:
        """Inverse of ``sigma_ve``."""
        return self.t_from_logsnr(-2.0 * torch.log(_as_tensor(sigma)))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha/dt, d sigma/dt) by forward-mode autodiff."""
        t = _as_tensor(t)
        ones = torch.ones_like(t)
        _, da = torch.func.jvp(self.alpha, (t,), (ones,))
        _, ds = torch.func.jvp(self.sigma, (t,), (ones,))
        return da, ds

    def logsnr_range(self) -> tuple[float, float]:
        """(logsnr at t=1, logsnr at t=0); either may be infinite."""
        ends = self.logsnr(torch.tensor([1.0, 0.0], dtype=torch.float64))
        return float(ends[0]), float(ends[1])

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class VPSchedule(Schedule):
    """Variance-preserving: alpha^2 + sigma^2 = 1, defined through its logSNR."""

    @abstractmethod
    def logsnr(self, t: Tensor) -> Tensor:  # type: ignore[override]
        """log(alpha^2 / sigma^2)."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sigmoid(self.logsnr(_as_tensor(t))).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sigmoid(-self.logsnr(_as_tensor(t))).sqrt()


class VPLinear(VPSchedule):
    """DDPM's linear beta 1e-4..0.02 over 1000 steps as the continuous VP-SDE (Ho et al. 2020; Song et al. 2021)."""

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VPLinear: need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = beta_min
        self.beta_max = beta_max

    def _neg_log_alpha2(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def logsnr(self, t: Tensor) -> Tensor:
        # log(a/(1-a)) with a = exp(-c): -log(expm1(c)), stable for small and large c.
        c = self._neg_log_alpha2(_as_tensor(t))
        return -torch.log(torch.expm1(c))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        c = torch.nn.functional.softplus(-_as_tensor(logsnr))  # -log sigmoid(logsnr)
        d = self.beta_max - self.beta_min
        return 2 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * c))


class Cosine(VPSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021): logsnr = -2 log tan(pi t / 2), time-rescaled to end at logsnr_min."""

    name = "cosine"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = math.inf) -> None:
        if not logsnr_min < logsnr_max:
            raise ValueError(f"Cosine: need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
        self.logsnr_min = logsnr_min
        self.logsnr_max = logsnr_max
        self._b = math.atan(math.exp(-0.5 * logsnr_max))
        self._a = math.atan(math.exp(-0.5 * logsnr_min)) - self._b

    def logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(torch.tan(self._a * _as_tensor(t) + self._b))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return (torch.atan(torch.exp(-0.5 * _as_tensor(logsnr))) - self._b) / self._a


class EDMPolynomial(VPSchedule):
    """EDM-molecules schedule alpha^2 = (1 - 2s)(1 - t^p)^2 + s (Hoogeboom et al. 2022, eq. 12; s = precision)."""

    name = "edm_poly"

    def __init__(self, power: float = 2.0, precision: float = 1e-5) -> None:
        if not 0 < precision < 0.5 or power <= 0:
            raise ValueError(f"EDMPolynomial: need power > 0 and 0 < precision < 0.5, got {power}, {precision}")
        self.power = power
        self.precision = precision

    def _alpha2(self, t: Tensor) -> Tensor:
        s = self.precision
        return (1 - 2 * s) * (1 - t**self.power) ** 2 + s

    def logsnr(self, t: Tensor) -> Tensor:
        a2 = self._alpha2(_as_tensor(t))
        return torch.log(a2) - torch.log1p(-a2)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        s = self.precision
        a2 = torch.sigmoid(_as_tensor(logsnr))
        inner = ((a2 - s) / (1 - 2 * s)).clamp(0.0, 1.0)
        return (1 - inner.sqrt()).clamp(0.0, 1.0) ** (1 / self.power)


class Sigmoid(VPSchedule):
    """Sigmoid schedule (Jabri et al. 2022; Chen 2023) with alpha^2 floored affinely at alpha2_min."""

    name = "sigmoid"

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0, alpha2_min: float = 1e-9) -> None:
        if not start < end or tau <= 0:
            raise ValueError(f"Sigmoid: need start < end and tau > 0, got {start}, {end}, {tau}")
        self.start, self.end, self.tau, self.alpha2_min = start, end, tau, alpha2_min
        self._v_start = 1 / (1 + math.exp(-start / tau))
        self._v_end = 1 / (1 + math.exp(-end / tau))

    def _alpha2(self, t: Tensor) -> Tensor:
        v = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        raw = (self._v_end - v) / (self._v_end - self._v_start)
        return self.alpha2_min + (1 - self.alpha2_min) * raw

    def logsnr(self, t: Tensor) -> Tensor:
        a2 = self._alpha2(_as_tensor(t))
        return torch.log(a2) - torch.log1p(-a2)

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        a2 = torch.sigmoid(_as_tensor(logsnr))
        raw = (a2 - self.alpha2_min) / (1 - self.alpha2_min)
        v = self._v_end - raw * (self._v_end - self._v_start)
        return (self.tau * torch.logit(v) - self.start) / (self.end - self.start)


class Karras(Schedule):
    """Variance-exploding sigma(t) with Karras' rho-interpolation between sigma_min and sigma_max (EDM, Karras et al. 2022).

    The default sigma_min = 0 makes t = 0 noise-free (sigma = sigma_max t^rho); sample with the 'karras' grid
    (sigma 80 .. 0.002, then 0, as in EDM) and train with ``t_sampling='lognormal'``.
    """

    name = "karras"

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 80.0, rho: float = 7.0) -> None:
        if not 0 <= sigma_min < sigma_max or rho <= 0:
            raise ValueError(f"Karras: need 0 <= sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + _as_tensor(t) * (hi - lo)) ** self.rho

    def logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * torch.log(self.sigma(t))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        s = torch.exp(-0.5 * _as_tensor(logsnr))
        return (s ** (1 / self.rho) - lo) / (hi - lo)


class Flow(Schedule):
    """Linear interpolant of flow matching / rectified flow: x_t = (1 - t) x0 + t eps (Lipman et al. 2023; Liu et al. 2023)."""

    name = "flow"

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - _as_tensor(t)

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t).clone()

    def logsnr(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * _as_tensor(logsnr))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    cls.name: cls for cls in (VPLinear, Cosine, EDMPolynomial, Sigmoid, Karras, Flow)
}


def get_schedule(name: str | Schedule, **kwargs: float) -> Schedule:
    """Build a schedule by name ('vp_linear', 'cosine', 'edm_poly', 'sigmoid', 'karras', 'flow')."""
    if isinstance(name, Schedule):
        return name
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}") from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"schedule {name!r}: bad parameters {kwargs}: {e}") from None


# --- step grids: decreasing times ts[0] > ... > ts[-1], steps + 1 points, ending at t = 0 ---

LOGSNR_CLIP = 20.0  # grids in logSNR / sigma stop at |logsnr| <= 20 where the schedule itself is unbounded


def grid_uniform_t(schedule: Schedule, steps: int, t_max: float = 1.0, t_min: float = 0.0) -> Tensor:
    """Times uniform in t (DDPM/DDIM's default spacing)."""
    _check_steps(steps)
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"grid: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


def grid_uniform_logsnr(
    schedule: Schedule, steps: int, logsnr_min: float | None = None, logsnr_max: float | None = None
) -> Tensor:
    """Times uniform in logSNR (DPM-Solver's recommended spacing, Lu et al. 2022), then a last step to t = 0."""
    _check_steps(steps)
    lo_s, hi_s = schedule.logsnr_range()
    lo = max(lo_s, -LOGSNR_CLIP) if logsnr_min is None else logsnr_min
    hi = min(hi_s, LOGSNR_CLIP) if logsnr_max is None else logsnr_max
    if not lo < hi:
        raise ValueError(f"grid: need logsnr_min < logsnr_max, got {lo}, {hi}")
    if hi >= hi_s:  # the schedule reaches hi at t = 0: spread all steps + 1 points
        lam = torch.linspace(lo, hi, steps + 1, dtype=torch.float64)
        ts = schedule.t_from_logsnr(lam)
        ts[-1] = 0.0
    else:
        lam = torch.linspace(lo, hi, steps, dtype=torch.float64)
        ts = torch.cat([schedule.t_from_logsnr(lam), torch.zeros(1, dtype=torch.float64)])
    return ts.clamp(0.0, 1.0)


def grid_karras(
    schedule: Schedule, steps: int, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0
) -> Tensor:
    """Karras et al. (2022) eq. 5: sigma_i^(1/rho) uniform between sigma_max and sigma_min, then t = 0."""
    _check_steps(steps)
    lo_s, hi_s = schedule.logsnr_range()
    s_top = math.exp(-0.5 * max(lo_s, -LOGSNR_CLIP))  # largest sigma the schedule reaches (clipped)
    s_bot = math.exp(-0.5 * min(hi_s, LOGSNR_CLIP))
    smax = min(80.0, s_top) if sigma_max is None else sigma_max
    smin = max(0.002, s_bot) if sigma_min is None else sigma_min
    if not 0 < smin < smax:
        raise ValueError(f"grid: need 0 < sigma_min < sigma_max, got {smin}, {smax}")
    reaches_bottom = smin <= math.exp(-0.5 * hi_s) if math.isfinite(hi_s) else False
    n = steps + 1 if reaches_bottom else steps
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    ts = schedule.t_from_sigma_ve(sig)
    if reaches_bottom:
        ts[-1] = 0.0
    else:
        ts = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    return ts.clamp(0.0, 1.0)


GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": grid_uniform_t,
    "logsnr": grid_uniform_logsnr,
    "karras": grid_karras,
}


def make_grid(schedule: Schedule, steps: int, kind: str = "karras", **kwargs: float) -> Tensor:
    """Step grid by name ('uniform' in t, 'logsnr' uniform in logSNR, 'karras' rho-spaced sigma)."""
    try:
        fn = GRIDS[kind]
    except KeyError:
        raise ValueError(f"unknown grid {kind!r}; expected one of {sorted(GRIDS)}") from None
    return fn(schedule, steps, **kwargs)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
