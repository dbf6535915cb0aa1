"""EDM evaluation of 3D molecules: distance-based bond orders, atom/molecule stability, RDKit validity,
uniqueness and novelty (Hoogeboom et al. 2022, "Equivariant Diffusion for Molecule Generation in 3D")."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import torch
from rdkit import Chem, rdBase

from domains.molecules.constants import (
    BOND_LENGTH_DOUBLE_PM,
    BOND_LENGTH_SINGLE_PM,
    BOND_LENGTH_TRIPLE_PM,
    BOND_MARGINS_PM,
    ELEMENT_INDEX,
    ELEMENTS,
    SYMBOLS,
    VALENCY,
    Z_TO_INDEX,
)

__all__ = [
    "Molecule",
    "MoleculeLike",
    "BatchBonds",
    "as_arrays",
    "bond_orders",
    "batch_bonds",
    "stability",
    "to_rdkit",
    "molecule_smiles",
    "evaluate_molecules",
]


class Molecule(NamedTuple):
    """A molecule as positions [n, 3] in Angstrom and element symbols (the exchange type of io/metrics)."""

    positions: np.ndarray
    elements: tuple[str, ...]


# (positions [n,3] array/tensor in Angstrom, element symbols or atomic numbers); Molecule is one.
MoleculeLike: TypeAlias = tuple[Any, Any]

_BOND_TYPES: dict[int, Chem.BondType] = {
    1: Chem.BondType.SINGLE,
    2: Chem.BondType.DOUBLE,
    3: Chem.BondType.TRIPLE,
}


def _threshold_table(lengths: dict[frozenset[str], float], margin: float) -> np.ndarray:
    """[E, E] table of reference length + margin in pm; -inf where the bond order does not exist (EDM rule)."""
    table = np.full((len(ELEMENTS), len(ELEMENTS)), -np.inf)
    for a in ELEMENTS:
        for b in ELEMENTS:
            length = lengths.get(frozenset((a, b)))
            if length is not None:
                table[ELEMENT_INDEX[a], ELEMENT_INDEX[b]] = length + margin
    return table


_T1 = _threshold_table(BOND_LENGTH_SINGLE_PM, BOND_MARGINS_PM[0])
_T2 = _threshold_table(BOND_LENGTH_DOUBLE_PM, BOND_MARGINS_PM[1])
_T3 = _threshold_table(BOND_LENGTH_TRIPLE_PM, BOND_MARGINS_PM[2])
_VALENCY = np.array([VALENCY[s] for s in ELEMENTS], dtype=np.int64)
_Z_TO_INDEX = np.asarray(Z_TO_INDEX, dtype=np.int64)  # atomic number -> ELEMENTS index (constants.Z_TO_INDEX)


def _element_index(e: Any) -> int:
    """Index into ELEMENTS of a symbol or atomic number; ValueError for anything outside the vocabulary."""
    if isinstance(e, str):
        idx = ELEMENT_INDEX.get(e.strip().capitalize())
    else:
        idx = ELEMENT_INDEX.get(SYMBOLS.get(int(e), ""))
    if idx is None:
        raise ValueError(f"element {e!r} not in vocabulary {','.join(ELEMENTS)}")
    return idx


def as_arrays(mol: MoleculeLike) -> tuple[np.ndarray, np.ndarray]:
    """(positions float64 [n, 3] in Angstrom, element indices int64 [n] into ELEMENTS) of a molecule-like pair."""
    positions, elements = mol
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if isinstance(elements, torch.Tensor):
        elements = elements.detach().cpu().numpy()
    if isinstance(elements, np.ndarray) and elements.dtype.kind in "iu":
        z = elements.reshape(-1).astype(np.int64)
        idx = _Z_TO_INDEX[np.clip(z, 0, len(_Z_TO_INDEX) - 1)]
        if np.any(idx < 0) or np.any(z >= len(_Z_TO_INDEX)):
            bad = z[(idx < 0) | (z >= len(_Z_TO_INDEX))][0]
            raise ValueError(f"element {int(bad)!r} not in vocabulary {','.join(ELEMENTS)}")
    else:
        idx = np.array([_element_index(e) for e in elements], dtype=np.int64)
    if len(idx) != len(pos):
        raise ValueError(f"{len(pos)} positions but {len(idx)} elements")
    return pos, idx


def _orders(dist_pm: np.ndarray, ei: np.ndarray, ej: np.ndarray) -> np.ndarray:
    """EDM bond order from distance (pm): 1 if d < b1+m1, then 2 if also d < b2+m2, then 3 if also d < b3+m3."""
    o1 = dist_pm < _T1[ei, ej]
    o2 = o1 & (dist_pm < _T2[ei, ej])
    o3 = o2 & (dist_pm < _T3[ei, ej])
    return o1.astype(np.int64) + o2 + o3


def _bond_matrix(pos: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """[n, n] EDM bond orders from float positions (Angstrom) and element indices."""
    dist_pm = 100.0 * np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    orders = _orders(dist_pm, idx[:, None], idx[None, :])
    np.fill_diagonal(orders, 0)
    return orders


def bond_orders(positions: Any, elements: Any) -> np.ndarray:
    """[n, n] int matrix of EDM distance-based bond orders (0 = no bond) of one molecule (Hoogeboom et al. 2022)."""
    return _bond_matrix(*as_arrays((positions, elements)))


class BatchBonds(NamedTuple):
    """Flattened molecules and their inferred bonds: atoms in CSR layout, bonds as (src < dst, order > 0)."""

    element_idx: np.ndarray  # [N] indices into ELEMENTS
    ptr: np.ndarray  # [M+1] atom offsets per molecule
    src: np.ndarray  # [B] global atom index, sorted by molecule
    dst: np.ndarray  # [B]
    order: np.ndarray  # [B] 1, 2 or 3
    bond_ptr: np.ndarray  # [M+1] bond offsets per molecule


def batch_bonds(mols: Sequence[MoleculeLike]) -> BatchBonds:
    """EDM bond orders of many molecules at once, vectorised over all intra-molecule atom pairs."""
    arrays = [as_arrays(m) for m in mols]
    counts = np.array([len(a[1]) for a in arrays], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    pos = np.concatenate([a[0] for a in arrays]) if arrays else np.zeros((0, 3))
    eidx = np.concatenate([a[1] for a in arrays]) if arrays else np.zeros(0, dtype=np.int64)
    mol_of_atom = np.repeat(np.arange(len(counts)), counts)
    # Every atom i is paired with all n_mol(i) atoms of its molecule; keep i < j.
    deg = counts[mol_of_atom]
    src = np.repeat(np.arange(len(eidx)), deg)
    block_start = np.repeat(np.cumsum(deg) - deg, deg)
    dst = ptr[mol_of_atom[src]] + (np.arange(len(src)) - block_start)
    keep = src < dst
    src, dst = src[keep], dst[keep]
    dist_pm = 100.0 * np.linalg.norm(pos[src] - pos[dst], axis=-1)
    order = _orders(dist_pm, eidx[src], eidx[dst])
    bonded = order > 0
    src, dst, order = src[bonded], dst[bonded], order[bonded]
    bond_ptr = np.searchsorted(mol_of_atom[src], np.arange(len(counts) + 1), side="left")
    return BatchBonds(eidx, ptr, src, dst, order, bond_ptr)


def _stability(bonds: BatchBonds) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom and per-molecule stability from inferred bonds: valence == allowed valency (EDM)."""
    n_atoms = len(bonds.element_idx)
    valence = np.bincount(bonds.src, bonds.order, n_atoms) + np.bincount(bonds.dst, bonds.order, n_atoms)
    atom_stable = valence.astype(np.int64) == _VALENCY[bonds.element_idx]
    counts = np.diff(bonds.ptr)
    mol_of_atom = np.repeat(np.arange(len(counts)), counts)
    unstable = np.bincount(mol_of_atom[~atom_stable], minlength=len(counts))
    return atom_stable, (unstable == 0) & (counts > 0)  # an empty molecule is not stable


def stability(mols: Sequence[MoleculeLike]) -> tuple[np.ndarray, np.ndarray]:
    """(atom_stable bool [N atoms], mol_stable bool [M]) under EDM's bond-order/valency rule."""
    return _stability(batch_bonds(mols))


def _rdkit_from_bonds(symbols: Iterable[str], bonds: Iterable[tuple[int, int, int]]) -> Chem.RWMol:
    """Unsanitised RDKit molecule with the given atoms and (i, j, order) bonds, as EDM's build_molecule."""
    mol = Chem.RWMol()
    for s in symbols:
        mol.AddAtom(Chem.Atom(s))
    for i, j, o in bonds:
        mol.AddBond(int(i), int(j), _BOND_TYPES[int(o)])
    return mol


def to_rdkit(positions: Any, elements: Any, conformer: bool = True) -> Chem.Mol:
    """Unsanitised RDKit molecule with EDM-inferred bonds and (optionally) the 3D conformer in Angstrom."""
    pos, idx = as_arrays((positions, elements))
    orders = _bond_matrix(pos, idx)
    ii, jj = np.nonzero(np.triu(orders, 1))
    mol = _rdkit_from_bonds((ELEMENTS[i] for i in idx), zip(ii, jj, orders[ii, jj]))
    if conformer:
        conf = Chem.Conformer(len(idx))
        conf.Set3D(True)
        for k, p in enumerate(pos):
            conf.SetAtomPosition(k, p.tolist())
        mol.AddConformer(conf, assignId=True)
    return mol.GetMol()


def _sanitized_smiles(mol: Chem.Mol) -> str | None:
    """Canonical SMILES if RDKit sanitisation succeeds, else None (EDM's mol2smiles)."""
    try:
        Chem.SanitizeMol(mol)
    except ValueError:
        return None
    return Chem.MolToSmiles(mol)


def _valid_smiles(mol: Chem.Mol) -> str | None:
    """EDM validity: the whole molecule must sanitise; the SMILES is that of its largest fragment."""
    if mol.GetNumAtoms() == 0:
        return None
    smiles = _sanitized_smiles(mol)
    if smiles is None or "." not in smiles:
        return smiles
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    largest = max(frags, key=lambda m: m.GetNumAtoms(), default=mol)
    return _sanitized_smiles(Chem.Mol(largest))


def _smiles_from_batch(bonds: BatchBonds) -> list[str | None]:
    """Validity SMILES (largest fragment) or None for every molecule of a BatchBonds."""
    out: list[str | None] = []
    with rdBase.BlockLogs():
        for m in range(len(bonds.ptr) - 1):
            a0, a1 = int(bonds.ptr[m]), int(bonds.ptr[m + 1])
            b0, b1 = int(bonds.bond_ptr[m]), int(bonds.bond_ptr[m + 1])
            symbols = [ELEMENTS[i] for i in bonds.element_idx[a0:a1]]
            triples = zip(bonds.src[b0:b1] - a0, bonds.dst[b0:b1] - a0, bonds.order[b0:b1])
            out.append(_valid_smiles(_rdkit_from_bonds(symbols, triples).GetMol()))
    return out


def molecule_smiles(mols: Sequence[MoleculeLike]) -> list[str | None]:
    """Canonical SMILES of each molecule's largest fragment under EDM's validity pipeline; None if invalid."""
    return _smiles_from_batch(batch_bonds(mols))


def _ratio(num: int, den: int) -> float | None:
    """num / den; None (undefined, JSON null) when den is zero, e.g. uniqueness when no molecule is valid."""
    return num / den if den else None


def evaluate_molecules(
    mols: Sequence[MoleculeLike], train_smiles: Iterable[str] | None = None
) -> dict[str, float | int | None]:
    """EDM metrics: atom/molecule stability, RDKit validity, uniqueness, valid x unique, novelty (Hoogeboom et al. 2022).

    A ratio whose denominator is zero is None, never NaN: uniqueness without valid molecules, novelty without
    unique ones, every ratio for an empty list, atom stability without atoms."""
    t0 = time.perf_counter()
    bonds = batch_bonds(mols)
    atom_stable, mol_stable = _stability(bonds)
    smiles = _smiles_from_batch(bonds)
    valid = [s for s in smiles if s is not None]
    unique = set(valid)
    n = len(mols)
    result: dict[str, float | int | None] = {
        "atom_stability": _ratio(int(atom_stable.sum()), len(atom_stable)),
        "mol_stability": _ratio(int(mol_stable.sum()), n),
        "validity": _ratio(len(valid), n),
        "uniqueness": _ratio(len(unique), len(valid)),
        "valid_x_unique": _ratio(len(unique), n),
        "num_molecules": n,
        "num_atoms": len(atom_stable),
        "num_stable_atoms": int(atom_stable.sum()),
        "num_stable_molecules": int(mol_stable.sum()),
        "num_valid": len(valid),
        "num_unique": len(unique),
    }
    if train_smiles is not None:
        train = train_smiles if isinstance(train_smiles, (set, frozenset)) else set(train_smiles)
        novel = [s for s in unique if s not in train]
        result["novelty"] = _ratio(len(novel), len(unique))
        result["num_novel"] = len(novel)
    result["seconds"] = time.perf_counter() - t0
    return result
