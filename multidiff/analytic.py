"""Gaussian mixtures with their exact posterior-mean denoiser E[x0 | x_t]: ground truth for samplers.

For x0 ~ sum_k w_k N(mu_k, s_k^2 I) on a linear subspace with orthogonal projector P (dimension d)
and x_t = alpha x0 + sigma P eps:
    p(x_t | k) = N(alpha P mu_k, (alpha^2 s_k^2 + sigma^2) P),
    E[x0 | x_t, k] = P mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha P mu_k),
and E[x0 | x_t] averages these with the posterior component weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .samplers import DenoiseFn
from .schedules import Schedule

__all__ = ["GaussianMixture", "centering_projector", "sliced_wasserstein"]


def centering_projector(num_atoms: int, dim: int = 3, dtype: torch.dtype = torch.float64) -> Tensor:
    """Projector onto zero-centre-of-mass configurations of ``num_atoms`` points in R^dim (flattened row-major)."""
    c = torch.eye(num_atoms, dtype=dtype) - torch.full((num_atoms, num_atoms), 1.0 / num_atoms, dtype=dtype)
    return torch.kron(c, torch.eye(dim, dtype=dtype))


class GaussianMixture:
    """Isotropic Gaussian mixture, optionally restricted to the range of an orthogonal projector."""

    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor, projector: Tensor | None = None) -> None:
        weights, means, stds = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, stds))
        if means.ndim != 2:
            raise ValueError(f"means: expected [K, D], got shape {tuple(means.shape)}")
        k, dim = means.shape
        if weights.shape != (k,) or stds.shape != (k,):
            raise ValueError(f"weights and stds: expected shape [{k}], got {tuple(weights.shape)} and {tuple(stds.shape)}")
        if (weights < 0).any() or not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-6):
            raise ValueError(f"weights: expected non-negative values summing to 1, got {weights.tolist()}")
        if (stds <= 0).any():
            raise ValueError("stds: expected positive standard deviations")
        if projector is None:
            projector = torch.eye(dim, dtype=torch.float64)
        projector = torch.as_tensor(projector, dtype=torch.float64)
        if projector.shape != (dim, dim):
            raise ValueError(f"projector: expected [{dim}, {dim}], got {tuple(projector.shape)}")
        self.weights, self.stds, self.projector = weights, stds, projector
        self.means = means @ projector.T
        self.dof = int(round(float(torch.trace(projector))))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, num: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(samples [num, D] float64, component index [num])."""
        comp = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn(num, self.dim, generator=generator, dtype=torch.float64) @ self.projector.T
        return self.means[comp] + self.stds[comp, None] * noise, comp

    def responsibilities(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Posterior component probabilities p(k | x_t) [B, K]."""
        var = alpha**2 * self.stds**2 + sigma**2
        diff2 = ((x[:, None, :] - alpha * self.means[None]) ** 2).sum(-1)
        logits = torch.log(self.weights) - 0.5 * self.dof * torch.log(var) - 0.5 * diff2 / var
        return torch.softmax(logits, dim=-1)

    def posterior_mean(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """E[x0 | x_t = x] for x [B, D]."""
        x = x.to(torch.float64)
        if sigma == 0:
            return x / alpha
        var = alpha**2 * self.stds**2 + sigma**2
        gain = alpha * self.stds**2 / var  # [K]
        resp = self.responsibilities(x, alpha, sigma)
        cond = self.means[None] + gain[None, :, None] * (x[:, None, :] - alpha * self.means[None])
        return (resp[..., None] * cond).sum(1)

    def denoiser(self, schedule: Schedule) -> DenoiseFn:
        """The exact denoiser ``denoise(x, t)`` for data from this mixture under ``schedule``."""

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            t64 = torch.as_tensor(t, dtype=torch.float64)
            a, s = float(schedule.alpha(t64)), float(schedule.sigma(t64))
            shape = x.shape
            d = self.posterior_mean(x.reshape(-1, self.dim), a, s)
            return d.reshape(shape).to(x.dtype)

        return denoise


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (Rabin et al. 2011)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"sliced_wasserstein: expected two [N, D] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.to(torch.float64) @ dirs).sort(0).values
    pb = (b.to(torch.float64) @ dirs).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())
