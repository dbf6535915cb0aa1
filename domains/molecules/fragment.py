"""The fragment frame: the position space of fragment completion (``multidiff sample molecules --inpaint``).

Its own module so that both the domain (sampling requests) and the EGNN (``MolEGNN``'s ``anchor``) can use it
without importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multidiff.spaces import ZeroCoM

__all__ = ["FragmentFrame"]


class FragmentFrame(ZeroCoM):
    """Positions modulo translation with the gauge "centroid of the ``anchor`` atoms = 0" per graph.

    The projection subtracts each graph's anchor centroid from all its atoms, so anchor rows that are
    already centred are never moved (used for fragment completion); graphs without anchors fall back to
    zero centre of mass. Differences between atoms, i.e. the geometry, are the same as under ZeroCoM.
    """

    def __init__(self, batch: Tensor, anchor: Tensor, num_graphs: int | None = None) -> None:
        super().__init__(batch, num_graphs)
        if anchor.shape != batch.shape or anchor.dtype != torch.bool:
            raise ValueError(f"anchor: expected a bool mask shaped like batch {tuple(batch.shape)}, got {tuple(anchor.shape)} {anchor.dtype}")
        self.anchor = anchor
        self.anchor_count = torch.bincount(self.batch[anchor], minlength=self.num_samples)

    def project(self, x: Tensor) -> Tensor:
        self.check(x)
        batch, anchor = self.batch.to(x.device), self.anchor.to(x.device)
        count = self.anchor_count.to(x.device)
        anchored = torch.zeros((self.num_samples,) + x.shape[1:], dtype=x.dtype, device=x.device)
        anchored.index_add_(0, batch[anchor], x[anchor])
        centre = torch.where((count > 0).unsqueeze(-1), anchored / count.clamp_min(1).unsqueeze(-1).to(x.dtype),
                             self.centre_of_mass(x))
        return x - centre[batch]
