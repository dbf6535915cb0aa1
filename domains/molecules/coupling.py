"""Equivariant optimal-transport coupling of noise and molecules (Klein et al. 2023; Song et al. 2023, EquiFM).

For each molecule, the noise rows are re-assigned to the atoms by a minimum-cost matching of positions
(``scipy.optimize.linear_sum_assignment`` on squared distances, Hungarian algorithm) and then rotated onto the
molecule by the Kabsch algorithm (proper rotation, det = +1, about the origin). Both maps are symmetries of the
isotropic, zero-centre-of-mass noise, so the noise keeps its distribution up to atom order and orientation, which
the permutation- and rotation-equivariant EGNN cannot see; the straight paths from noise to data get shorter.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from multidiff.spaces import Space

__all__ = ["equivariant_ot", "kabsch_rotation", "transport_cost"]


def kabsch_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The proper rotation R minimising ||source @ R.T - target|| for centred [n, 3] point sets (Kabsch 1976)."""
    h = source.T @ target
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    return vt.T @ np.diag([1.0, 1.0, d if d != 0 else 1.0]) @ u.T


def _graph_batch(space: Space, num_rows: int) -> Tensor:
    batch = getattr(space, "batch", None)
    if batch is None:
        positions = getattr(space, "positions", None)
        batch = getattr(positions, "batch", None)
    if batch is None:
        raise ValueError("equivariant_ot: the space has no per-atom graph index (expected a molecules MolSpace)")
    if batch.numel() != num_rows:
        raise ValueError(f"equivariant_ot: graph index has {batch.numel()} rows, the batch {num_rows}")
    return batch


def equivariant_ot(x0: Tensor, noise: Tensor, space: Space) -> Tensor:
    """Noise rows permuted (Hungarian on position distances) and positions rotated (Kabsch) onto each molecule."""
    batch = _graph_batch(space, x0.shape[0])
    counts = torch.bincount(batch.cpu()).tolist()
    if any(n == 1 for n in counts):
        raise ValueError("equivariant_ot: a molecule of one atom has nothing to align (its zero-CoM position is 0)")
    x_np = x0.detach().cpu().to(torch.float64).numpy()
    z_np = noise.detach().cpu().to(torch.float64).numpy()
    out = z_np.copy()
    start = 0
    for n in counts:
        if n == 0:
            continue
        xs, zs = x_np[start:start + n], z_np[start:start + n]
        cost = ((xs[:, None, :3] - zs[None, :, :3]) ** 2).sum(-1)
        _, cols = linear_sum_assignment(cost)
        zs = zs[cols]
        rot = kabsch_rotation(zs[:, :3], xs[:, :3])
        zs = zs.copy()
        zs[:, :3] = zs[:, :3] @ rot.T
        out[start:start + n] = zs
        start += n
    return torch.from_numpy(out).to(noise.device, noise.dtype)


def transport_cost(x0: Tensor, noise: Tensor, batch: Tensor) -> Tensor:
    """Mean squared position distance between each atom and its noise row, per molecule [B]."""
    d = (x0[:, :3] - noise[:, :3]).pow(2).sum(-1).to(torch.float64)
    num = int(batch.max()) + 1
    total = torch.zeros(num, dtype=torch.float64).index_add_(0, batch, d)
    return total / torch.bincount(batch, minlength=num).to(torch.float64)
