"""Atom featurisation: atoms -> the rows the molecule models see (EDM, Hoogeboom et al. 2022).

One row per atom ``[position (3, Angstrom) | one-hot element * 0.25 (5) | atomic number * 0.1 (1)]``. Used by
the domain (training batches, fragments), the property predictor and anyone building model input from
molecules; it imports only ``constants``, so none of them has to import another.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from domains.molecules.constants import CHARGE_SCALE, ELEMENTS, ONE_HOT_SCALE, Z_TO_INDEX

__all__ = ["atom_rows", "element_index", "num_features"]

_Z_TO_INDEX = torch.tensor(Z_TO_INDEX, dtype=torch.long)  # constants.Z_TO_INDEX as a lookup tensor


def element_index(z: Tensor) -> Tensor:
    """Atomic numbers -> one-hot columns (indices into ``ELEMENTS``); -1 for an element outside the vocabulary."""
    return _Z_TO_INDEX[z.long()]


def num_features(data: Any) -> int:
    """Invariant feature columns per atom: one-hot elements (+ scaled atomic number when ``data.include_charges``)."""
    return len(ELEMENTS) + (1 if data.include_charges else 0)


def atom_rows(pos: Tensor, z: Tensor, include_charges: bool = True, one_hot_scale: float = ONE_HOT_SCALE) -> Tensor:
    """Atoms -> rows ``[pos | one_hot * 0.25 | Z * 0.1]`` (EDM feature scaling, Hoogeboom et al. 2022)."""
    cols = [pos.to(torch.float32),
            torch.nn.functional.one_hot(element_index(z), len(ELEMENTS)).to(torch.float32) * one_hot_scale]
    if include_charges:
        cols.append(z.to(torch.float32).unsqueeze(-1) * CHARGE_SCALE)
    return torch.cat(cols, dim=-1)
