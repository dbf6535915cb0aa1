"""Guidance as wrappers around a denoiser: classifier-free, gradient (classifier) guidance, inpainting.

Conditions are a dict of tensors. ``cond["uncond"]`` (BoolTensor [B]) marks samples that are to be
treated as unconditional; a missing condition key means unconditional for every sample.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .kernels import Kernel
from .samplers import Callback, DenoiseFn, _ddim_coefficients, _emit, _Run, get_sampler
from .schedules import Schedule
from .spaces import Euclidean, Space

__all__ = [
    "UNCOND",
    "drop_conditions",
    "ClassifierFreeGuidance",
    "GradientGuidance",
    "Inpaint",
    "inpaint",
    "sample_repaint",
]

UNCOND = "uncond"
CondDenoiseFn = Callable[[Tensor, Tensor, "dict[str, Tensor] | None"], Tensor]


def drop_conditions(
    cond: dict[str, Tensor], p: float, num: int, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Condition dropout for classifier-free guidance training (Ho & Salimans 2022): mark samples unconditional with prob. p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    device = next((v.device for v in cond.values()), torch.device("cpu"))
    drop = (torch.rand(num, generator=generator) < p).to(device)
    old = cond.get(UNCOND)
    return {**cond, UNCOND: drop if old is None else (old.to(device) | drop)}


def _mark_uncond(cond: dict[str, Tensor] | None, num: int, device: torch.device) -> dict[str, Tensor]:
    return {**(cond or {}), UNCOND: torch.ones(num, dtype=torch.bool, device=device)}


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale (D_c - D_u); scale 1 is plain conditional.

    With ``batched=True`` the conditional and unconditional passes are one call on the concatenated batch
    (x and every condition tensor are concatenated along dim 0). Graph batches that need a ``batch``
    index must use ``batched=False`` (two calls) or give ``num_samples``-aware concatenation themselves.

    ``interval=(lo, hi)`` guides only at times ``lo < t <= hi`` and is plain conditional (one pass, half the
    cost) elsewhere: guidance in a limited interval (Kynkaanniemi et al. 2024).
    """

    def __init__(
        self,
        denoise: CondDenoiseFn,
        cond: dict[str, Tensor],
        scale: float,
        *,
        num_samples: int | None = None,
        batched: bool = True,
        interval: tuple[float, float] | None = None,
    ) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite guidance scale, got {scale}")
        if interval is not None:
            lo, hi = (float(v) for v in interval)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"guidance interval (sample.guidance_interval): expected [lo, hi] with 0 <= lo < hi <= 1 "
                                 f"(diffusion times), got {interval}")
            interval = (lo, hi)
        self.denoise, self.cond, self.scale = denoise, cond, scale
        self.num_samples, self.batched, self.interval = num_samples, batched, interval

    def active(self, t: Tensor) -> bool:
        """Whether guidance applies at time ``t`` (a scalar, or one time shared by the batch)."""
        if self.interval is None:
            return True
        tt = torch.as_tensor(t).detach().flatten()
        if tt.numel() > 1 and not bool((tt == tt[0]).all()):
            raise ValueError("ClassifierFreeGuidance: a guidance interval needs one time per call, got per-sample times")
        return self.interval[0] < float(tt[0]) <= self.interval[1]

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0 or not self.active(t):
            return self.denoise(x, t, self.cond)
        num = self.num_samples if self.num_samples is not None else x.shape[0]
        base = self.cond.get(UNCOND)
        cond_c = dict(self.cond)
        if base is None:
            cond_c[UNCOND] = torch.zeros(num, dtype=torch.bool, device=x.device)
        cond_u = _mark_uncond(self.cond, num, x.device)
        if self.batched:
            both = {k: torch.cat([cond_c[k], cond_u[k]]) for k in cond_c}
            d_c, d_u = self.denoise(torch.cat([x, x]), t, both).chunk(2)
        else:
            d_c, d_u = self.denoise(x, t, cond_c), self.denoise(x, t, cond_u)
        return d_u + self.scale * (d_c - d_u)


class GradientGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021) in x0 form: D' = D + scale sigma^2/alpha grad_x log p(y | x_t).

    ``log_prob(x, t)`` returns a per-sample log-likelihood (or any reward) of shape [B]. With
    ``through_denoiser=True`` it is evaluated on the x0 estimate and differentiated through the
    denoiser (reconstruction guidance, Chung et al. 2023 "DPS"; Ho et al. 2022).

    ``temper=True`` multiplies the log-likelihood by alpha^2 / (alpha^2 + sigma^2): a likelihood of the
    clean-data estimate is far too sharp at high noise, where sigma^2/alpha^2 grows without bound; tempered,
    the correction to x0 is about ``scale * sigma^2 / (alpha^2 + sigma^2) * grad_x0 log p`` (at most
    ``scale`` times the clean-data gradient, vanishing as sigma -> 0). ``clip`` bounds every entry of the
    correction to [-clip, clip] (a predictor can have huge gradients far from its training data).
    """

    def __init__(
        self,
        denoise: DenoiseFn,
        log_prob: Callable[[Tensor, Tensor], Tensor],
        schedule: Schedule,
        scale: float = 1.0,
        *,
        space: Space | None = None,
        through_denoiser: bool = False,
        temper: bool = False,
        clip: float | None = None,
    ) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite gradient-guidance scale, got {scale}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip: expected a positive bound on the correction, got {clip}")
        self.denoise, self.log_prob, self.schedule, self.scale = denoise, log_prob, schedule, scale
        self.space = space if space is not None else Euclidean()
        self.through_denoiser, self.temper, self.clip = through_denoiser, temper, clip

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64)
        a, s = float(self.schedule.alpha(t64)), float(self.schedule.sigma(t64))
        if self.scale == 0.0 or a == 0.0:
            return self.denoise(x, t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if self.through_denoiser:
                d = self.denoise(xg, t)
                lp = self.log_prob(d, t)
            else:
                d = self.denoise(x, t)
                lp = self.log_prob(xg, t)
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        weight = self.scale * s**2 / a * (a**2 / (a**2 + s**2) if self.temper else 1.0)
        delta = weight * grad
        if self.clip is not None:
            delta = delta.clamp(-self.clip, self.clip)
        return d.detach() + self.space.project(delta)


class Inpaint:
    """Inpainting by replacement (Song et al. 2021, App. I; Lugmayr et al. 2022): known entries are fixed.

    At every call the known part of the input is replaced by alpha_t * known + sigma_t * n (one noise draw
    ``n`` for the whole trajectory) and the known part of the output by ``known``, so a sampler that ends
    at sigma = 0 returns ``known`` exactly where ``mask`` is True.
    """

    def __init__(
        self,
        denoise: DenoiseFn,
        known: Tensor,
        mask: Tensor,
        schedule: Schedule,
        *,
        space: Space | None = None,
        generator: torch.Generator | None = None,
        kernel: Kernel | None = None,
    ) -> None:
        space = space if space is not None else Euclidean()
        try:
            mask = torch.broadcast_to(mask.to(torch.bool), known.shape)
        except RuntimeError:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to known {tuple(known.shape)}") from None
        self.denoise, self.known, self.mask, self.schedule = denoise, known, mask, schedule
        self.noise = (kernel or Kernel()).noise(known, space, generator)  # the model's kernel (PFGM++: Student-t)
        self.discrete = space.discrete_parts()

    def noisy_known(self, t: Tensor) -> Tensor:
        """alpha(t) known + sigma(t) n (categorical parts: the known classes themselves)."""
        t64 = torch.as_tensor(t, dtype=torch.float64)
        a, s = float(self.schedule.alpha(t64)), float(self.schedule.sigma(t64))
        out = a * self.known + s * self.noise
        for sl, _ in self.discrete:
            out[..., sl] = self.known[..., sl]
        return out

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        x = torch.where(self.mask, self.noisy_known(t).to(x.dtype), x)
        return torch.where(self.mask, self.known.to(x.dtype), self.denoise(x, t))

    def finalize(self, x: Tensor) -> Tensor:
        """Put the known entries back bit-exactly (for samplers that do not end exactly on the denoised value)."""
        return torch.where(self.mask, self.known.to(x.dtype), x)


def inpaint(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    known: Tensor,
    mask: Tensor,
    *,
    sampler: str = "dpmpp_2m",
    space: Space | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    **opts: Any,
) -> Tensor:
    """Fill the entries where ``mask`` is False with any sampler; entries where it is True equal ``known`` exactly."""
    wrapped = Inpaint(denoise, known, mask, schedule, space=space, generator=generator)
    out = get_sampler(sampler)(wrapped, x, ts, schedule, space, generator=generator, callback=callback, **opts)
    return wrapped.finalize(out)


def sample_repaint(
    denoise: DenoiseFn,
    x: Tensor,
    ts: Tensor,
    schedule: Schedule,
    known: Tensor,
    mask: Tensor,
    space: Space | None = None,
    *,
    resample: int = 5,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1): ancestral steps with the known part re-noised from data,
    each step repeated ``resample`` times by diffusing x_s back to x_t (jump length 1)."""
    if resample < 1:
        raise ValueError(f"resample: expected >= 1, got {resample}")
    run = _Run(denoise, x, ts, schedule, space)
    mask = torch.broadcast_to(mask.to(torch.bool), x.shape)
    for i in range(run.steps):
        a_t, s_t, a_s, s_s = run.alpha[i], run.sigma[i], run.alpha[i + 1], run.sigma[i + 1]
        for u in range(resample):
            d = torch.where(mask, known.to(x.dtype), run.denoise(x, run.t(i), i))
            w_eps, c = _ddim_coefficients(a_t, s_t, a_s, s_s, 1.0)
            x_s = a_s * d + w_eps * run.eps(x, d, i)
            if c > 0:
                x_s = x_s + c * run.noise(x, generator)
            known_s = a_s * known.to(x.dtype) + s_s * run.noise(x, generator) if s_s > 0 else known.to(x.dtype)
            x_s = torch.where(mask, known_s, x_s)
            if u < resample - 1 and s_s > 0:
                # forward-diffuse back to t: x_t = (a_t/a_s) x_s + sqrt(s_t^2 - (a_t/a_s)^2 s_s^2) n
                k = a_t / a_s
                x = k * x_s + math.sqrt(max(0.0, s_t**2 - (k * s_s) ** 2)) * run.noise(x, generator)
            else:
                x = x_s
                break
        _emit(callback, run, i, x, d)
    return torch.where(mask, known.to(x.dtype), x)
