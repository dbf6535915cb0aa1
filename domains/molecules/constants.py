"""Dataset and chemistry constants for QM9 molecules (element vocabulary, bond lengths, valencies, units)."""

from __future__ import annotations

from typing import Final, NamedTuple

# Element vocabulary of QM9 (Ramakrishnan et al. 2014), in the one-hot order EDM uses (Hoogeboom et al. 2022).
ELEMENTS: Final[tuple[str, ...]] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: Final[dict[str, int]] = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
SYMBOLS: Final[dict[int, str]] = {z: s for s, z in ATOMIC_NUMBERS.items()}
ELEMENT_INDEX: Final[dict[str, int]] = {s: i for i, s in enumerate(ELEMENTS)}
MAX_ATOMIC_NUMBER: Final[int] = 9
# The one element-index table: atomic number Z -> column of the one-hot (index into ELEMENTS), -1 for an element
# outside the vocabulary. The torch / numpy lookups (features.element_index, metrics.as_arrays) are views of it.
Z_TO_INDEX: Final[tuple[int, ...]] = tuple(ELEMENT_INDEX.get(SYMBOLS.get(z, ""), -1) for z in range(MAX_ATOMIC_NUMBER + 1))

# Allowed valency (sum of bond orders) of a stable atom, EDM stability criterion (Hoogeboom et al. 2022).
VALENCY: Final[dict[str, int]] = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}

# Reference covalent bond lengths in pm (standard tabulated values, e.g. CRC Handbook /
# wiredchemist.com "Bond lengths and energies"), used by EDM's distance-based bond-order rule.
# Keys are unordered element pairs; a missing pair means that bond order does not exist.
BOND_LENGTH_SINGLE_PM: Final[dict[frozenset[str], float]] = {
    frozenset(("H", "H")): 74.0,
    frozenset(("H", "C")): 109.0,
    frozenset(("H", "N")): 101.0,
    frozenset(("H", "O")): 96.0,
    frozenset(("H", "F")): 92.0,
    frozenset(("C", "C")): 154.0,
    frozenset(("C", "N")): 147.0,
    frozenset(("C", "O")): 143.0,
    frozenset(("C", "F")): 135.0,
    frozenset(("N", "N")): 145.0,
    frozenset(("N", "O")): 140.0,
    frozenset(("N", "F")): 136.0,
    frozenset(("O", "O")): 148.0,
    frozenset(("O", "F")): 142.0,
    frozenset(("F", "F")): 142.0,
}
BOND_LENGTH_DOUBLE_PM: Final[dict[frozenset[str], float]] = {
    frozenset(("C", "C")): 134.0,
    frozenset(("C", "N")): 129.0,
    frozenset(("C", "O")): 120.0,
    frozenset(("N", "N")): 125.0,
    frozenset(("N", "O")): 121.0,
    frozenset(("O", "O")): 121.0,
}
BOND_LENGTH_TRIPLE_PM: Final[dict[frozenset[str], float]] = {
    frozenset(("C", "C")): 120.0,
    frozenset(("C", "N")): 116.0,
    frozenset(("C", "O")): 113.0,
    frozenset(("N", "N")): 110.0,
}
# Tolerances added to the single/double/triple reference lengths, in pm (EDM, Hoogeboom et al. 2022).
BOND_MARGINS_PM: Final[tuple[float, float, float]] = (10.0, 5.0, 3.0)

# Two atoms closer than this (Angstrom) are rejected as overlapping in user input.
MIN_ATOM_DISTANCE_A: Final[float] = 0.1
# A coordinate beyond this (Angstrom) in user input is not a molecule's (QM9 molecules span < 20 A; even
# PDB-frame ligand coordinates stay within a few hundred): rejected like NaN / inf.
MAX_COORDINATE_A: Final[float] = 1000.0

# EDM feature scaling (Hoogeboom et al. 2022): one-hot * 0.25, charges * 0.1. Not applied by the loader.
ONE_HOT_SCALE: Final[float] = 0.25
CHARGE_SCALE: Final[float] = 0.1

# CODATA 2018: 1 Hartree = 27.211386 eV.
HARTREE_TO_MEV: Final[float] = 27211.386

# QM9 size after removing the 3,054 molecules that failed the consistency check (Ramakrishnan et al. 2014).
QM9_NUM_MOLECULES: Final[int] = 130831


class PropertySpec(NamedTuple):
    """A QM9 target property: name, unit, source CSV column and the factor converting it to the unit."""

    name: str
    unit: str
    column: str
    scale: float
    description: str


# The six conditioning targets of EDM (Hoogeboom et al. 2022, Table 3), in EDM's order.
PROPERTIES: Final[tuple[PropertySpec, ...]] = (
    PropertySpec("alpha", "Bohr^3", "Polarizability_bohr3", 1.0, "isotropic polarizability"),
    PropertySpec("gap", "meV", "HOMO_LUMO_gap_au", HARTREE_TO_MEV, "HOMO-LUMO gap"),
    PropertySpec("homo", "meV", "HOMO_au", HARTREE_TO_MEV, "highest occupied orbital energy"),
    PropertySpec("lumo", "meV", "LUMO_au", HARTREE_TO_MEV, "lowest unoccupied orbital energy"),
    PropertySpec("mu", "D", "Dipole_debye", 1.0, "dipole moment"),
    PropertySpec("Cv", "cal/mol K", "Heatcapacity_Cv_cal_mol_K", 1.0, "heat capacity at 298.15 K"),
)
PROPERTY_NAMES: Final[tuple[str, ...]] = tuple(p.name for p in PROPERTIES)
PROPERTY_UNITS: Final[dict[str, str]] = {p.name: p.unit for p in PROPERTIES}
