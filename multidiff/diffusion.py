"""Prediction targets, preconditioning and the training loss, owned by one ``Denoiser`` wrapper.

The backbone only ever sees ``backbone(c_in * x_t, c_noise, cond, **kwargs)`` and returns F; the wrapper
turns F into the x0 estimate ("denoised") according to the prediction target, in fp32:

- ``eps``: F estimates eps,            denoised = (x_t - sigma F) / alpha
- ``x0``:  F estimates x0,             denoised = F
- ``v``:   F estimates v (Salimans & Ho 2022), generalised to any (alpha, sigma) and data std sigma_data
           as EDM's F-target (Karras et al. 2022): denoised = c_skip x_t - c_out F with
           c_skip = sigma_data^2 alpha / r^2, c_out = sigma sigma_data / r, r^2 = alpha^2 sigma_data^2 + sigma^2.
- ``velocity``: F estimates the flow-matching velocity u = dx_t/dt = alpha' x0 + sigma' eps (Lipman et al. 2023;
           on the ``flow`` schedule u = eps - x0), denoised = (sigma' x_t - sigma F) / (alpha sigma' - sigma alpha').

Training options of the ``Denoiser`` (each one recipe key in ``diffusion``):

- ``t_sampling``: uniform, EDM's log-normal sigma, ``logit_normal`` (Esser et al. 2024: t = sigmoid(m + s n)) or
  ``beta`` (t ~ Beta(a, b); t = 0 is data here, so Beta(1, 2) skews toward the data end like FlowMol's Beta(2, 1)).
- ``coupling``: a callable ``(x0, noise, space) -> noise`` that pairs each noise draw with its data item before the
  interpolation (e.g. the molecules' equivariant optimal-transport alignment, Klein et al. 2023); it must leave the
  noise distribution unchanged (a permutation / rotation of an isotropic draw).
- categorical parts (``multidiff.spaces.Categorical`` inside the batch's space): corrupted to uniform classes instead
  of Gaussian noise, fed to the backbone unscaled, its output read as logits (denoised = softmax probabilities),
  trained with cross-entropy times ``categorical_weight`` beside the weighted MSE of the continuous parts
  (per-part weights as in MiDi / FlowMol); see ``multidiff.categorical``.
- ``kernel`` / ``aug_dim``: the law of the noise of the continuous parts, ``gaussian`` or PFGM++'s heavy-tailed
  ``pfgmpp`` with D = ``aug_dim`` augmented dimensions (Xu et al. 2023; see ``multidiff.kernels``); the sigma grid,
  preconditioning and probability-flow ODE are the same for both.
- ``self_condition``: probability p of self-conditioning (Chen et al. 2022, "Analog Bits"): with probability p a batch
  first runs the model without gradient and feeds that x0 estimate back as ``backbone(..., self_cond=denoised)``;
  sampling feeds each step's previous estimate (see ``SelfConditioning``).

Loss weightings are stated as weights on ||denoised - x0||^2 (Kingma & Gao 2023): ``eps`` / ``snr``: SNR,
``x0``: 1, ``v`` / ``edm``: 1 / c_out^2 (= SNR + 1 when sigma_data = 1), ``min_snr``: min(SNR, gamma)
(Hang et al. 2023). The loss is computed in float64 with logSNR clipped to +-40, so weights that grow
without bound at the ends of a schedule (SNR for eps-prediction) stay finite.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from .categorical import corrupt, cross_entropy, kappa, rows_of
from .guidance import drop_conditions
from .kernels import Kernel, get_kernel
from .schedules import Schedule, append_dims, get_schedule
from .spaces import Euclidean, Space

__all__ = [
    "SelfConditioning",
    "Target",
    "Weighting",
    "DiffusionConfig",
    "Denoiser",
    "add_noise",
    "to_x0",
    "to_eps",
    "to_v",
    "convert",
    "loss_weight",
]

Target = Literal["eps", "x0", "v", "velocity"]
Weighting = Literal["target", "eps", "snr", "x0", "v", "edm", "min_snr"]
TSampling = Literal["uniform", "lognormal", "logit_normal", "beta"]
TARGETS: tuple[str, ...] = ("eps", "x0", "v", "velocity")
T_SAMPLINGS: tuple[str, ...] = ("uniform", "lognormal", "logit_normal", "beta")
Coupling = Callable[[Tensor, Tensor, Space], Tensor]
WEIGHTINGS: tuple[str, ...] = ("target", "eps", "snr", "x0", "v", "edm", "min_snr")
LOGSNR_LIMIT = 40.0  # |logsnr| is clipped here when turned into weights or the noise embedding


@dataclass
class DiffusionConfig:
    """Schedule, prediction target, loss weighting and training-time noise/condition sampling."""

    schedule: str = "cosine"
    schedule_args: dict[str, float] = field(default_factory=dict)
    target: Target = "v"
    weighting: Weighting = "target"
    min_snr_gamma: float = 5.0
    sigma_data: float = 1.0
    t_sampling: TSampling = "uniform"
    t_min: float = 1e-4
    lognormal_mean: float = -1.2
    lognormal_std: float = 1.2
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    beta_a: float = 1.0
    beta_b: float = 2.0
    cond_drop: float = 0.1
    coupling: str | None = None  # a domain's noise <-> data coupling (molecules: equivariant_ot)
    self_condition: float = 0.0  # probability of a self-conditioned training batch (0: off)
    categorical_weight: float = 1.0  # weight of a categorical part's cross-entropy beside the continuous loss
    kernel: Literal["gaussian", "pfgmpp"] = "gaussian"  # perturbation kernel (pfgmpp: PFGM++, Xu et al. 2023)
    aug_dim: float | None = None  # PFGM++'s D (augmented dimensions, > 0; .inf = the Gaussian limit)

    def __post_init__(self) -> None:
        get_kernel(self.kernel, self.aug_dim)  # errors name diffusion.kernel / diffusion.aug_dim

    def build_schedule(self) -> Schedule:
        """The configured schedule."""
        return get_schedule(self.schedule, **self.schedule_args)


def add_noise(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x_t = alpha x0 + sigma eps, with per-sample alpha/sigma broadcast over trailing dims."""
    return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * noise


def _r(alpha: Tensor, sigma: Tensor) -> Tensor:
    return torch.sqrt(alpha**2 + sigma**2)


def to_x0(pred: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 from an eps / x0 / v prediction (v = (alpha eps - sigma x0) / r, r^2 = alpha^2 + sigma^2)."""
    a, s = append_dims(alpha, x_t.ndim), append_dims(sigma, x_t.ndim)
    if kind == "x0":
        return pred
    if kind == "eps":
        return (x_t - s * pred) / a
    if kind == "v":
        r = _r(a, s)
        return (a * x_t - s * r * pred) / r**2
    raise ValueError(f"kind: expected one of {TARGETS}, got {kind!r}")


def to_eps(pred: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps from an eps / x0 / v prediction."""
    a, s = append_dims(alpha, x_t.ndim), append_dims(sigma, x_t.ndim)
    if kind == "eps":
        return pred
    if kind == "x0":
        return (x_t - a * pred) / s
    if kind == "v":
        r = _r(a, s)
        return (s * x_t + a * r * pred) / r**2
    raise ValueError(f"kind: expected one of {TARGETS}, got {kind!r}")


def to_v(pred: Tensor, kind: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v from an eps / x0 / v prediction."""
    if kind == "v":
        return pred
    a, s = append_dims(alpha, x_t.ndim), append_dims(sigma, x_t.ndim)
    x0 = to_x0(pred, kind, x_t, alpha, sigma)
    eps = to_eps(pred, kind, x_t, alpha, sigma)
    return (a * eps - s * x0) / _r(a, s)


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Exact conversion between prediction targets at a given x_t."""
    fn = {"x0": to_x0, "eps": to_eps, "v": to_v}.get(dst)
    if fn is None:
        raise ValueError(f"dst: expected one of {TARGETS}, got {dst!r}")
    return fn(pred, src, x_t, alpha, sigma)


def _snr_weight(weighting: str, logsnr: Tensor, sigma_data: float, gamma: float) -> Tensor:
    lam = logsnr.clamp(-LOGSNR_LIMIT, LOGSNR_LIMIT)
    snr = torch.exp(lam)
    if weighting in ("eps", "snr"):
        return snr
    if weighting == "x0":
        return torch.ones_like(snr)
    if weighting in ("v", "edm"):
        # 1 / c_out^2 in sigma_ve = exp(-lam/2): (sigma_ve^2 + sd^2) / (sigma_ve sd)^2 = 1/sd^2 + snr
        return 1.0 / sigma_data**2 + snr
    if weighting == "min_snr":
        return snr.clamp(max=gamma)
    raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")


def loss_weight(weighting: str, logsnr: Tensor, sigma_data: float = 1.0, gamma: float = 5.0) -> Tensor:
    """Weight w(logsnr) of ||denoised - x0||^2 for a named weighting ('target' is not resolved here)."""
    return _snr_weight(weighting, logsnr, sigma_data, gamma)


# DiffusionConfig fields a Denoiser reads as attributes (den.target, den.t_min, ...); set from its config
_DENOISER_SETTINGS = ("target", "sigma_data", "min_snr_gamma", "t_sampling", "t_min", "lognormal_mean", "lognormal_std",
                      "logit_normal_mean", "logit_normal_std", "beta_a", "beta_b", "cond_drop", "self_condition",
                      "categorical_weight")


class Denoiser(nn.Module):
    """Wraps a backbone with preconditioning and the loss (cf. EDM's ``EDMPrecond``, k-diffusion's ``Denoiser``)."""

    def __init__(
        self,
        backbone: nn.Module,
        config: DiffusionConfig | Schedule | str = "cosine",
        *,
        coupling: Coupling | None = None,
        kernel: Kernel | str | None = None,
        **options: Any,
    ) -> None:
        """``Denoiser(backbone, DiffusionConfig(...), coupling=...)``: everything but the backbone and the
        coupling callable comes from the config (``from_config`` is the same with a check of ``cfg.coupling``).

        The keyword form ``Denoiser(backbone, "cosine" | schedule, target="x0", ...)`` takes any
        ``DiffusionConfig`` field as a keyword and builds that config; built this way ``cond_drop`` defaults to 0
        (no condition dropout unless asked), not a recipe's 0.1. ``kernel`` may also be a ``Kernel`` object."""
        super().__init__()
        schedule: Schedule | None = None
        if isinstance(kernel, str):
            options["kernel"] = kernel
        if isinstance(config, DiffusionConfig):
            if options:
                config = dataclasses.replace(config, **options)
        else:
            if isinstance(config, Schedule):
                schedule, name = config, config.name
            else:
                name = config
            options.setdefault("cond_drop", 0.0)
            config = DiffusionConfig(schedule=name, **options)
        cfg = config
        self.kernel = kernel if isinstance(kernel, Kernel) else get_kernel(cfg.kernel, cfg.aug_dim)
        if cfg.target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {cfg.target!r}")
        if cfg.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {cfg.weighting!r}")
        if cfg.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling: expected one of {T_SAMPLINGS}, got {cfg.t_sampling!r}")
        if cfg.t_sampling == "beta" and not (cfg.beta_a > 0 and cfg.beta_b > 0):
            raise ValueError(f"beta_a, beta_b: expected > 0 for t_sampling='beta', got {cfg.beta_a}, {cfg.beta_b}")
        if cfg.t_sampling == "logit_normal" and not cfg.logit_normal_std > 0:
            raise ValueError(f"logit_normal_std: expected > 0, got {cfg.logit_normal_std}")
        if not 0.0 <= cfg.self_condition <= 1.0:
            raise ValueError(f"self_condition: expected a probability in [0, 1], got {cfg.self_condition}")
        if cfg.self_condition > 0 and not getattr(backbone, "supports_self_conditioning", False):
            raise ValueError(f"self_condition={cfg.self_condition}: the backbone {type(backbone).__name__} cannot take a "
                             f"self-conditioning input (it does not set supports_self_conditioning; build it with "
                             f"self-conditioning enabled, e.g. the domain's model option)")
        if not (cfg.categorical_weight >= 0 and math.isfinite(cfg.categorical_weight)):
            raise ValueError(f"categorical_weight: expected a finite weight >= 0, got {cfg.categorical_weight}")
        if coupling is not None and not callable(coupling):
            raise TypeError(f"coupling: expected a callable (x0, noise, space) -> noise, got {type(coupling).__name__}")
        if not 0.0 <= cfg.cond_drop <= 1.0:
            raise ValueError(f"cond_drop: expected a probability in [0, 1], got {cfg.cond_drop}")
        if cfg.sigma_data <= 0:
            raise ValueError(f"sigma_data: expected > 0, got {cfg.sigma_data}")
        self.config = cfg  # the one source of the settings below
        self.backbone = backbone
        self.schedule = schedule if schedule is not None else cfg.build_schedule()
        self.coupling = coupling
        for name in _DENOISER_SETTINGS:
            setattr(self, name, getattr(cfg, name))
        self.weighting = cfg.target if cfg.weighting == "target" else cfg.weighting

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: DiffusionConfig, coupling: Coupling | None = None) -> "Denoiser":
        """Build from a ``DiffusionConfig`` (``coupling``: the callable named by ``cfg.coupling``, from the domain)."""
        if cfg.coupling is not None and coupling is None:
            raise ValueError(f"diffusion.coupling={cfg.coupling!r}: no coupling callable was given for it")
        return cls(backbone, cfg, coupling=coupling)

    # --- preconditioning -------------------------------------------------------------------------

    def _coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t64 = t.detach().to(torch.float64)
        return self.schedule.alpha(t64), self.schedule.sigma(t64), self.schedule.logsnr(t64)

    def _per_sample(self, t: Tensor | float, num: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.ndim == 0:
            t = t.expand(num)
        if t.shape != (num,):
            raise ValueError(f"t: expected a scalar or one time per sample ({num}), got shape {tuple(t.shape)}")
        return t

    def _expand(self, v: Tensor, x: Tensor, space: Space | None) -> Tensor:
        """Per-sample coefficient [B] -> broadcastable against x (graph spaces index by ``batch``)."""
        batch = getattr(space, "batch", None)
        if batch is not None:
            v = v[batch.to(v.device)]
        return append_dims(v, x.ndim)

    def forward(
        self, x: Tensor, t: Tensor | float, cond: dict[str, Tensor] | None = None, *, space: Space | None = None, **kwargs: Any
    ) -> Tensor:
        """The x0 estimate D(x_t, t) in fp32; ``space`` maps per-sample t to rows (graph batches)."""
        return self._denoise(x, t, cond, space, **kwargs)[0]

    def _denoise(
        self, x: Tensor, t: Tensor | float, cond: dict[str, Tensor] | None, space: Space | None, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """(denoised, raw backbone output). Categorical parts enter unscaled and leave as softmax probabilities."""
        num = space.num_samples if space is not None and space.num_samples is not None else x.shape[0]
        t = self._per_sample(t, num, x.device)
        alpha, sigma, logsnr = self._coefficients(t)
        a, s = self._expand(alpha, x, space), self._expand(sigma, x, space)
        sd = self.sigma_data
        r2 = a**2 * sd**2 + s**2
        x64 = x.to(torch.float64)
        c_in = r2.rsqrt()
        c_noise = (-logsnr.clamp(-LOGSNR_LIMIT, LOGSNR_LIMIT) / 8).to(torch.float32)  # EDM: ln(sigma_ve) / 4
        x_in = c_in * x64
        discrete = space.discrete_parts() if space is not None else []
        for sl, _ in discrete:
            x_in[..., sl] = x64[..., sl]
        out = self.backbone(x_in.to(torch.float32), c_noise, cond, **kwargs).to(torch.float64)
        if self.target == "eps":
            d = (x64 - s * out) / a
        elif self.target == "x0":
            d = out
        elif self.target == "velocity":
            da, ds = (self._expand(v, x, space) for v in self.schedule.derivatives(t))
            d = (ds * x64 - s * out) / (a * ds - s * da)
        else:
            d = (sd**2 * a / r2) * x64 - (s * sd / r2.sqrt()) * out
        if discrete:
            d = d.clone()
            for sl, _ in discrete:
                d[..., sl] = torch.softmax(out[..., sl], dim=-1)
        return (d.to(torch.float32) if x.dtype != torch.float64 else d), out

    def bind(self, cond: dict[str, Tensor] | None = None, *, space: Space | None = None, **kwargs: Any):
        """A sampler-ready ``denoise(x, t)`` with conditions and backbone kwargs fixed."""

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            return self(x, t, cond, space=space, **kwargs)

        return denoise

    # --- training -----------------------------------------------------------------------------

    def sample_t(self, num: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        """Training times on [t_min, 1]: uniform, EDM's log-normal sigma_ve (P_mean, P_std) mapped to t, logit-normal
        (Esser et al. 2024) or Beta(a, b)."""
        if self.t_sampling == "uniform":
            u = torch.rand(num, generator=generator, dtype=torch.float64)
            t = self.t_min + (1 - self.t_min) * u
        elif self.t_sampling == "logit_normal":
            n = torch.randn(num, generator=generator, dtype=torch.float64)
            t = torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * n).clamp(self.t_min, 1.0)
        elif self.t_sampling == "beta":
            # inverse CDF, so the draw goes through ``generator`` (torch's Beta sampler takes none)
            t = _beta_icdf(torch.rand(num, generator=generator, dtype=torch.float64), self.beta_a, self.beta_b)
            t = t.clamp(self.t_min, 1.0)
        else:
            n = torch.randn(num, generator=generator, dtype=torch.float64)
            sve = torch.exp(self.lognormal_mean + self.lognormal_std * n)
            t = self.schedule.t_from_sigma_ve(sve).clamp(self.t_min, 1.0)
        return t.to(device)

    def loss(
        self,
        x0: Tensor,
        cond: dict[str, Tensor] | None = None,
        *,
        space: Space | None = None,
        generator: torch.Generator | None = None,
        reduce: bool = True,
        **kwargs: Any,
    ) -> Tensor:
        """Weighted denoising loss (mean over samples, or per sample when reduce=False)."""
        space = space if space is not None else Euclidean()
        space.check(x0, "x0")
        if not torch.isfinite(x0).all():
            raise FloatingPointError("x0: the training batch contains NaN or inf")
        num = space.num_samples if space.num_samples is not None else x0.shape[0]
        t = self.sample_t(num, x0.device, generator)
        noise = self.kernel.noise(x0, space, generator)
        x0 = space.project(x0)
        if self.coupling is not None:
            noise = self.coupling(x0, noise, space)
        alpha, sigma, logsnr = self._coefficients(t)
        a, s = self._expand(alpha, x0, space), self._expand(sigma, x0, space)
        x_t = (a * x0 + s * noise).to(x0.dtype)
        discrete = space.discrete_parts()
        if discrete:
            x_t = x_t.clone()
            k_rows = rows_of(kappa(self.schedule, t), space, x0)
            for sl, part in discrete:
                x_t[..., sl] = corrupt(x0[..., sl], noise[..., sl], k_rows, generator, part.batch)
        if cond is not None and self.cond_drop > 0:
            cond = drop_conditions(cond, self.cond_drop, num, generator=generator)
        if self.self_condition > 0:
            coin = torch.rand((), generator=generator).item() < self.self_condition
            prev = None
            if coin:
                with torch.no_grad():
                    prev = self.forward(x_t, t, cond, space=space, self_cond=None, **kwargs).detach()
            kwargs = {**kwargs, "self_cond": prev}
        d, out = self._denoise(x_t, t, cond, space, **kwargs)
        x0_64 = x0.to(torch.float64)
        w = _snr_weight(self.weighting, logsnr, self.sigma_data, self.min_snr_gamma)
        per_sample = w * space.continuous_mean_per_sample((d.to(torch.float64) - x0_64) ** 2)
        for sl, part in discrete:
            ce = cross_entropy(out[..., sl], x0_64[..., sl]).unsqueeze(-1)
            per_sample = per_sample + self.categorical_weight * part.mean_per_sample(ce)
        per_sample = per_sample.to(torch.float32)
        return per_sample.mean() if reduce else per_sample

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule!r}, target={self.target!r}, weighting={self.weighting!r}, "
                f"sigma_data={self.sigma_data}, kernel={self.kernel!r}")


def _beta_icdf(u: Tensor, a: float, b: float, points: int = 4097) -> Tensor:
    """Inverse CDF of Beta(a, b) at ``u`` by interpolation of the numerically integrated density (float64)."""
    x = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    mid = 0.5 * (x[1:] + x[:-1])
    log_pdf = (a - 1) * torch.log(mid) + (b - 1) * torch.log1p(-mid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.exp(log_pdf - log_pdf.max()), 0)])
    cdf = cdf / cdf[-1]
    idx = torch.searchsorted(cdf, u.clamp(0, 1)).clamp(1, points - 1)
    lo, hi = cdf[idx - 1], cdf[idx]
    frac = (u - lo) / (hi - lo).clamp_min(1e-300)
    return x[idx - 1] + frac * (x[idx] - x[idx - 1])


class SelfConditioning:
    """Sampling-time self-conditioning (Chen et al. 2022): each call passes the previous x0 estimate as ``self_cond``.

    Wraps ``denoise(x, t, cond, self_cond=...)``; one instance per sampling call (it holds the last estimate).
    A conditional/unconditional pair in one batch (CFG, ``batched=True``) gets the estimate repeated.
    """

    def __init__(self, denoise: Callable[..., Tensor]) -> None:
        self.denoise = denoise
        self.prev: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        prev = self.prev
        if prev is not None and prev.shape[0] != x.shape[0]:
            prev = prev.repeat(x.shape[0] // prev.shape[0], *([1] * (prev.ndim - 1)))
        return self.denoise(x, t, cond, self_cond=prev)

    def update(self, denoised: Tensor) -> Tensor:
        """Remember the (guided) estimate of this step for the next call; returns it unchanged."""
        self.prev = denoised.detach()
        return denoised
