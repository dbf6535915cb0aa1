"""Categorical parts of a state: uniform-corruption interpolation, cross-entropy loss and the sampler's jump update.

A categorical part holds one-hot rows (``multidiff.spaces.Categorical``). Following discrete flow models (Campbell
et al. 2024) with uniform noise, a clean class x0 is corrupted at time t to a uniformly random class with probability
kappa(t) = sigma(t) / (alpha(t) + sigma(t)), which is t itself on the ``flow`` schedule and runs from 0 (data) to 1
(noise) on every schedule. The network returns logits; the x0 estimate ("denoised") of a one-hot is the vector of
class probabilities. Going from t to s < t, a row jumps to a class drawn from the denoised probabilities with
probability (kappa(t) - kappa(s)) / kappa(t) and keeps its class otherwise: given x0 this maps the marginal
(1 - kappa_t) delta_x0 + kappa_t / K exactly onto the one at s. The last step (kappa = 0) takes the most probable class.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .schedules import Schedule
from .spaces import Generators, Space

__all__ = ["kappa", "corrupt", "jump", "two_jump_probs", "cross_entropy", "rows_of"]


def kappa(schedule: Schedule, t: Tensor) -> Tensor:
    """Corruption probability sigma / (alpha + sigma) at times ``t`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    return s / (a + s)


def rows_of(per_sample: Tensor, space: Space, x: Tensor) -> Tensor:
    """A per-sample value [B] broadcast to the rows of ``x`` (graph spaces index by ``batch``), shape x.shape[:-1]."""
    batch = getattr(space, "batch", None)
    if batch is not None:
        return per_sample.to(x.device)[batch.to(x.device)]
    return per_sample.to(x.device).reshape((-1,) + (1,) * (x.ndim - 2)).expand(x.shape[:-1])


def _uniform(shape: torch.Size, generator: Generators, batch: Tensor | None, device: torch.device) -> Tensor:
    """Uniform draws per row; with one generator per sample, sample i's rows come from ``generator[i]`` alone."""
    if not isinstance(generator, (list, tuple)):
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)
    out = torch.empty(shape, dtype=torch.float64)
    for i, g in enumerate(generator):
        if batch is None:
            out[i] = torch.rand(shape[1:], generator=g, dtype=torch.float64)
        else:
            sel = torch.nonzero(batch.cpu() == i).squeeze(-1)
            out[sel] = torch.rand((sel.numel(),) + tuple(shape[1:]), generator=g, dtype=torch.float64)
    return out.to(device)


def corrupt(x0: Tensor, noise: Tensor, k_rows: Tensor, generator: Generators = None, batch: Tensor | None = None) -> Tensor:
    """x_t of a categorical part: each row is ``noise``'s (uniform) class with probability ``k_rows``, else x0's."""
    keep = _uniform(x0.shape[:-1], generator, batch, x0.device) >= k_rows
    return torch.where(keep.unsqueeze(-1), x0, noise)


def jump(x: Tensor, probs: Tensor, k_t: float, k_s: float, generator: Generators = None,
         batch: Tensor | None = None) -> Tensor:
    """One reverse step t -> s of a categorical part given the denoised class probabilities (see the module doc)."""
    classes = x.shape[-1]
    if k_s <= 0:
        return F.one_hot(probs.argmax(-1), classes).to(x.dtype)
    p = probs.to(torch.float64).clamp_min(0)
    cdf = torch.cumsum(p, -1)
    u = _uniform(x.shape[:-1], generator, batch, x.device)
    draw = (cdf < (u * cdf[..., -1]).unsqueeze(-1)).sum(-1).clamp_max(classes - 1)  # inverse-CDF draw from probs
    moves = _uniform(x.shape[:-1], generator, batch, x.device) < (k_t - k_s) / k_t
    return torch.where(moves.unsqueeze(-1), F.one_hot(draw, classes).to(x.dtype), x)


def two_jump_probs(p1: Tensor, p2: Tensor, k_t: float, k_m: float, k_s: float) -> Tensor:
    """Class probabilities p* whose one jump t -> s has the law of the two jumps t -> m (with ``p1``) -> s (with
    ``p2``, drawn at the reached x_m): progressive distillation's target for a categorical part.

    A row keeps its class through both jumps with probability (k_m / k_t)(k_s / k_m) = k_s / k_t, the keep probability
    of one jump t -> s, so the moves must match: q p* = q1 (1 - q2) p1 + q2 p2 with q = (k_t - k_s) / k_t,
    q1 = (k_t - k_m) / k_t, q2 = (k_m - k_s) / k_m. ``p2`` from one draw of x_m is an unbiased estimate (a
    cross-entropy to it averages over x_m)."""
    if not 0 < k_s < k_m < k_t:
        raise ValueError(f"two_jump_probs: expected 0 < k_s < k_m < k_t, got {k_s}, {k_m}, {k_t}")
    w1 = k_s * (k_t - k_m) / (k_m * (k_t - k_s))
    return w1 * p1 + (1.0 - w1) * p2


def cross_entropy(logits: Tensor, x0: Tensor) -> Tensor:
    """Per-row cross-entropy of ``logits`` against the one-hot ``x0`` (float64), shape x0.shape[:-1]."""
    return F.cross_entropy(logits.to(torch.float64).reshape(-1, x0.shape[-1]), x0.reshape(-1, x0.shape[-1]).argmax(-1),
                           reduction="none").reshape(x0.shape[:-1])
