"""Perturbation kernels: the law of the noise n in x_t = alpha(t) x0 + sigma(t) n on the continuous parts of a state.

- ``gaussian``: n ~ N(0, I) on the space (diffusion).
- ``pfgmpp``: PFGM++ (Xu et al. 2023, "PFGM++: Unlocking the Potential of Physics-Inspired Generative Models") with
  D augmented dimensions. In variance-exploding units (x_t / alpha = x0 + sigma_ve n) the perturbation has norm
  R = r sqrt(B / (1 - B)) with r = sigma_ve sqrt(D), B ~ Beta(N/2, D/2), and a uniform direction in the item's N
  dimensions (N = ``space.dof`` of its continuous parts: all samples of a clip, 3(n-1) positions + features of a
  molecule, different per molecule). B / (1 - B) = X / Y with X ~ chi2_N and Y ~ chi2_D independent, and a standard
  normal g on the N-dimensional space has ||g||^2 ~ chi2_N independently of its direction, so
  n = g sqrt(D / Y): a multivariate Student-t with D degrees of freedom (N enters through the space alone, zero
  centre of mass included), which tends to N(0, I) as D -> infinity (Y / D -> 1). The sigma grid, the
  preconditioning and the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma are unchanged (r = sigma sqrt(D)),
  so every deterministic sampler applies; samplers that inject fresh Gaussian noise mid-trajectory (ancestral, DDPM
  posterior steps, SDE, Heun churn) have no PFGM++ counterpart and are refused (``Kernel.check_sampler``).

Categorical parts (``multidiff.spaces.Categorical``) keep their uniform-class noise under every kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .schedules import append_dims
from .spaces import Generators, Space

__all__ = ["Kernel", "GaussianKernel", "PFGMPPKernel", "KERNELS", "get_kernel", "chi2"]

KERNELS: tuple[str, ...] = ("gaussian", "pfgmpp")


class Kernel:
    """The Gaussian kernel of diffusion; subclasses change the law of the noise (see the module doc)."""

    name = "gaussian"

    def noise(self, x: Tensor, space: Space, generator: Generators = None) -> Tensor:
        """A draw of n shaped like ``x`` on ``space`` (categorical parts: uniform classes); see ``Generators``."""
        return space.randn_like(x, generator)

    @property
    def gaussian(self) -> bool:
        """Whether n is exactly N(0, I), so samplers may inject Gaussian noise."""
        return True

    def check_sampler(self, sampler: str, opts: dict[str, Any] | None = None) -> None:
        """Raise ValueError when ``sampler`` (with ``opts``) injects noise this kernel does not define."""
        if self.gaussian:
            return
        opts = opts or {}
        injects = {
            "ancestral": "draws DDPM posterior noise at every step",
            "euler_maruyama": "integrates the reverse SDE with Gaussian increments",
            "repaint": "re-noises with Gaussian noise",
        }.get(sampler)
        if sampler == "ddim" and float(opts.get("eta", 0.0)) > 0:
            injects = f"with eta={opts['eta']} draws Gaussian posterior noise"
        if sampler == "heun" and float(opts.get("churn", 0.0)) > 0:
            injects = f"with churn={opts['churn']} adds Gaussian noise (S_churn)"
        if injects is not None:
            raise ValueError(
                f"sampler {sampler!r} {injects}, which diffusion.kernel={self.name!r} ({self!r}) does not define; "
                f"use a deterministic sampler: heun (churn=0), euler, ddim (eta=0), dpmpp_2m or adaptive"
            )

    def __repr__(self) -> str:
        return "GaussianKernel()"


GaussianKernel = Kernel


class PFGMPPKernel(Kernel):
    """PFGM++'s kernel with ``aug_dim`` = D augmented dimensions (Xu et al. 2023, Sec. 4): n = g sqrt(D / chi2_D)."""

    name = "pfgmpp"

    def __init__(self, aug_dim: float) -> None:
        if isinstance(aug_dim, bool) or not isinstance(aug_dim, (int, float)) or math.isnan(aug_dim) or aug_dim <= 0:
            raise ValueError(f"diffusion.aug_dim: PFGM++ needs D > 0 augmented dimensions (e.g. 128 or 2048; "
                             f"inf is the Gaussian limit), got {aug_dim!r}")
        self.aug_dim = float(aug_dim)

    @property
    def gaussian(self) -> bool:
        return math.isinf(self.aug_dim)

    def noise(self, x: Tensor, space: Space, generator: Generators = None) -> Tensor:
        g = space.randn_like(x, generator)
        if self.gaussian:
            return g
        num = space.num_samples if space.num_samples is not None else x.shape[0]
        if isinstance(generator, (list, tuple)):
            y = torch.cat([chi2(self.aug_dim, 1, gen) for gen in generator]) if num else torch.zeros(0, dtype=torch.float64)
        else:
            y = chi2(self.aug_dim, num, generator)
        scale = torch.sqrt(self.aug_dim / y).to(device=x.device, dtype=x.dtype)
        batch = getattr(space, "batch", None)
        if batch is not None:
            scale = scale[batch.to(x.device)]
        out = g * append_dims(scale, x.ndim)
        for sl, _ in space.discrete_parts():  # uniform classes stay as drawn
            out[..., sl] = g[..., sl]
        return out

    def __repr__(self) -> str:
        return f"PFGMPPKernel(aug_dim={self.aug_dim:g})"


def get_kernel(name: str | Kernel = "gaussian", aug_dim: float | None = None) -> Kernel:
    """Kernel by name: 'gaussian' (no ``aug_dim``) or 'pfgmpp' (``aug_dim`` = D > 0, inf = Gaussian limit)."""
    if isinstance(name, Kernel):
        return name
    if name == "gaussian":
        if aug_dim is not None:
            raise ValueError(f"diffusion.aug_dim={aug_dim}: only used with diffusion.kernel='pfgmpp' (kernel is 'gaussian')")
        return Kernel()
    if name == "pfgmpp":
        if aug_dim is None:
            raise ValueError("diffusion.aug_dim: diffusion.kernel='pfgmpp' needs D, the number of augmented dimensions "
                             "(e.g. 128 or 2048)")
        return PFGMPPKernel(aug_dim)
    raise ValueError(f"diffusion.kernel: expected one of {KERNELS}, got {name!r}")


def chi2(df: float, num: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` chi-square(df) draws (float64) as 2 Gamma(df/2) by Marsaglia & Tsang (2000), from ``generator``'s
    normals and uniforms (torch's own Gamma sampler takes no generator)."""
    a = df / 2
    boost = a < 1  # Gamma(a) = Gamma(a + 1) U^(1/a)
    a_eff = a + 1 if boost else a
    d = a_eff - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(num, dtype=torch.float64)
    todo = torch.arange(num)
    while todo.numel():
        z = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if boost:
        out = out * torch.rand(num, generator=generator, dtype=torch.float64) ** (1 / a)
    return 2 * out
