"""Molecule files: XYZ and SDF (MDL molfile) readers with input validation, SDF/XYZ writers and PNG grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import Draw

from domains.molecules.constants import ELEMENTS, MAX_COORDINATE_A, MIN_ATOM_DISTANCE_A, SYMBOLS
from domains.molecules.metrics import Molecule, MoleculeLike, as_arrays, to_rdkit

__all__ = [
    "Molecule",
    "MoleculeFormatError",
    "XYZRecord",
    "read_sdf",
    "read_text",
    "read_xyz",
    "read_xyz_records",
    "write_png_grid",
    "write_sdf",
    "write_xyz",
]


class MoleculeFormatError(ValueError):
    """A molecule file is empty, malformed, uses an element outside the vocabulary, or has overlapping atoms."""


def _symbol(token: str, vocabulary: Sequence[str], where: str) -> str:
    """Canonical element symbol of an XYZ/SDF token (symbol or atomic number), checked against the vocabulary."""
    symbol = SYMBOLS.get(int(token), token) if token.isdigit() else token.strip().capitalize()
    if symbol not in vocabulary:
        raise MoleculeFormatError(f"{where}: element {symbol} not in vocabulary {','.join(vocabulary)}")
    return symbol


def _check_overlap(pos: np.ndarray, where: str) -> None:
    """Reject molecules with two atoms closer than MIN_ATOM_DISTANCE_A (atoms on top of each other)."""
    if len(pos) < 2:
        return
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    d[np.diag_indices(len(pos))] = np.inf
    i, j = np.unravel_index(np.argmin(d), d.shape)
    if d[i, j] < MIN_ATOM_DISTANCE_A:
        a, b = sorted((int(i), int(j)))
        raise MoleculeFormatError(
            f"{where}: atoms {a + 1} and {b + 1} are {d[i, j]:.3f} A apart "
            f"(atoms on top of each other; expected distance >= {MIN_ATOM_DISTANCE_A} A)"
        )


_BINARY_BYTES = bytes(range(0x00, 0x09)) + bytes(range(0x0E, 0x20))  # control bytes no text file holds


def read_text(path: str | Path, kind: str) -> str:
    """The text of a molecule file; MoleculeFormatError naming it when it is binary (NUL / control bytes, e.g.
    a gzip file). UTF-8, or Latin-1 when it is not valid UTF-8 (old SD files carry Latin-1 property values)."""
    path = Path(path)
    data = path.read_bytes()
    bad = next((i for i, b in enumerate(data[:1 << 20]) if b in _BINARY_BYTES), None)
    if bad is not None:
        hint = " (gzip-compressed: decompress it first)" if data[:2] == b"\x1f\x8b" else ""
        raise MoleculeFormatError(f"{path}: not a text {kind} file: binary data (byte 0x{data[bad]:02x} at offset "
                                  f"{bad}){hint}; expected a text {kind} file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _read_text(path: Path, kind: str) -> str:
    """File contents (`read_text`); MoleculeFormatError when it holds nothing but whitespace."""
    text = read_text(path, kind)
    if not text.strip():
        raise MoleculeFormatError(f"{path}: empty file, expected at least one {kind} record")
    return text


def _check_coordinates(pos: np.ndarray, where: str) -> None:
    """Reject NaN / inf coordinates and absurd magnitudes (|x| > MAX_COORDINATE_A), naming the first bad atom."""
    bad = ~np.isfinite(pos) | (np.abs(np.nan_to_num(pos, nan=0.0)) > MAX_COORDINATE_A)
    if bad.any():
        atom, axis = (int(v) for v in np.argwhere(bad)[0])
        raise MoleculeFormatError(
            f"{where}, atom {atom + 1}: coordinate {'xyz'[axis]} = {pos[atom, axis]:g} A is not a molecule's "
            f"(expected finite coordinates within +-{MAX_COORDINATE_A:g} A)")


class XYZRecord(NamedTuple):
    """One record of an XYZ file: the molecule, its comment line and the 1-based line of its atom count."""

    molecule: Molecule
    comment: str
    line: int


def read_xyz(path: str | Path, vocabulary: Sequence[str] = ELEMENTS, *, check_geometry: bool = True) -> list[Molecule]:
    """All records of a (multi-record) XYZ file: count line, comment line, then `element x y z` lines (Angstrom).

    ``check_geometry=False`` reads samples (``multidiff sample``'s own ``molecules.xyz``): no overlap, finiteness
    or magnitude checks, since a collapsed or exploded sample is a bad sample to be scored, not bad input.
    """
    return [r.molecule for r in read_xyz_records(path, vocabulary, check_geometry=check_geometry)]


def read_xyz_records(path: str | Path, vocabulary: Sequence[str] = ELEMENTS, *,
                     check_geometry: bool = True) -> list[XYZRecord]:
    """``read_xyz`` with each record's comment line and line number (the one XYZ parser)."""
    path = Path(path)
    lines = _read_text(path, "XYZ").splitlines()
    mols: list[XYZRecord] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():  # blank lines between records
            i += 1
            continue
        rec = len(mols) + 1
        head = f"{path}, record {rec} (line {i + 1})"
        fields = lines[i].split()
        if len(fields) != 1 or not fields[0].isdigit() or int(fields[0]) < 1:
            raise MoleculeFormatError(f"{head}: malformed record, expected a positive atom count, got {lines[i]!r}")
        n = int(fields[0])
        atom_lines = lines[i + 2 : i + 2 + n]
        if len(atom_lines) < n:
            raise MoleculeFormatError(
                f"{head}: malformed record, expected a comment line and {n} atom lines, file ends after {len(atom_lines)}"
            )
        symbols: list[str] = []
        pos = np.empty((n, 3))
        for k, line in enumerate(atom_lines):
            where = f"{path}, record {rec}, line {i + 3 + k}"
            parts = line.split()
            try:
                if len(parts) < 4:
                    raise ValueError
                pos[k] = [float(v) for v in parts[1:4]]
                if check_geometry and not np.all(np.isfinite(pos[k])):
                    raise ValueError
            except ValueError:
                raise MoleculeFormatError(
                    f"{where}: malformed record, expected 'element x y z' with finite coordinates, got {line!r}"
                ) from None
            if check_geometry and np.abs(pos[k]).max() > MAX_COORDINATE_A:
                raise MoleculeFormatError(
                    f"{where}: coordinate {np.abs(pos[k]).max():g} A is not a molecule's (expected |x|, |y|, |z| "
                    f"<= {MAX_COORDINATE_A:g} A), got {line!r}")
            symbols.append(_symbol(parts[0], vocabulary, where))
        if check_geometry:
            _check_overlap(pos, head)
        mols.append(XYZRecord(Molecule(pos, tuple(symbols)), lines[i + 1], i + 1))
        i += 2 + n
    return mols


def _record_start_lines(text: str) -> list[int]:
    """1-based first line of every molfile record in an SD file (records end with `$$$$`)."""
    starts = [1]
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip() == "$$$$":
            starts.append(no + 1)
    return starts


def read_sdf(path: str | Path, vocabulary: Sequence[str] = ELEMENTS) -> list[Molecule]:
    """All records of an SD file via RDKit (unsanitised, explicit H kept), with 3D coordinates in Angstrom."""
    path = Path(path)
    starts = _record_start_lines(_read_text(path, "SDF"))
    mols: list[Molecule] = []
    with rdBase.BlockLogs():
        supplier = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False, strictParsing=True)
        for k, mol in enumerate(supplier):
            line = starts[k] if k < len(starts) else starts[-1]
            head = f"{path}, record {k + 1} (line {line})"
            if mol is None:
                raise MoleculeFormatError(
                    f"{head}: malformed record, expected an MDL molfile (header, counts line, atom and bond blocks)"
                )
            if mol.GetNumAtoms() == 0 or mol.GetNumConformers() == 0:
                raise MoleculeFormatError(f"{head}: malformed record, expected atoms with coordinates, found none")
            symbols = tuple(_symbol(a.GetSymbol(), vocabulary, f"{head}, atom {a.GetIdx() + 1}") for a in mol.GetAtoms())
            pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
            _check_coordinates(pos, head)
            _check_overlap(pos, head)
            mols.append(Molecule(pos, symbols))
    if not mols:
        raise MoleculeFormatError(f"{path}: empty file, expected at least one SDF record")
    return mols


def _symbols(mol: MoleculeLike) -> tuple[np.ndarray, list[str]]:
    """(positions [n, 3], element symbols) of a molecule-like pair."""
    pos, idx = as_arrays(mol)
    return pos, [ELEMENTS[i] for i in idx]


def write_xyz(mols: Sequence[MoleculeLike], path: str | Path, comments: Sequence[str] | None = None) -> Path:
    """Multi-record XYZ file (Angstrom), one record per molecule."""
    path = Path(path)
    out: list[str] = []
    for k, mol in enumerate(mols):
        pos, symbols = _symbols(mol)
        out.append(str(len(symbols)))
        out.append(comments[k] if comments is not None else f"molecule {k}")
        out.extend(f"{s:<2s} {x:16.10f} {y:16.10f} {z:16.10f}" for s, (x, y, z) in zip(symbols, pos))
    path.write_text("\n".join(out) + "\n")
    return path


def _sanitized(mol: Chem.Mol) -> Chem.Mol | None:
    """A sanitised copy, or None when RDKit rejects it (EDM validity)."""
    copy = Chem.Mol(mol)
    try:
        Chem.SanitizeMol(copy)
    except ValueError:
        return None
    return copy


def write_sdf(mols: Sequence[MoleculeLike], path: str | Path) -> Path:
    """SD file with 3D coordinates and EDM-inferred bonds; invalid molecules are written too, as they are."""
    path = Path(path)
    with rdBase.BlockLogs():
        writer = Chem.SDWriter(str(path))
        writer.SetKekulize(False)
        try:
            for k, m in enumerate(mols):
                pos, symbols = _symbols(m)
                mol = to_rdkit(pos, symbols)
                ok = _sanitized(mol)
                mol.UpdatePropertyCache(strict=False)
                mol.SetProp("_Name", f"molecule {k}")
                mol.SetProp("valid", "1" if ok is not None else "0")
                if ok is not None:
                    mol.SetProp("smiles", Chem.MolToSmiles(Chem.RemoveHs(ok)))
                writer.write(mol)
        finally:
            writer.close()
    return path


def write_png_grid(
    mols: Sequence[MoleculeLike],
    path: str | Path,
    mols_per_row: int = 4,
    sub_image_size: tuple[int, int] = (250, 250),
) -> Path:
    """PNG grid of RDKit 2-D depictions with SMILES legends; invalid molecules as a labelled blank placeholder."""
    path = Path(path)
    images: list[Chem.Mol] = []
    legends: list[str] = []
    with rdBase.BlockLogs():
        for m in mols:
            pos, symbols = _symbols(m)
            ok = _sanitized(to_rdkit(pos, symbols, conformer=False))
            if ok is None:
                counts = {s: symbols.count(s) for s in ELEMENTS if s in symbols}
                formula = "".join(f"{s}{c if c > 1 else ''}" for s, c in counts.items())
                images.append(Chem.Mol())
                legends.append(f"invalid ({formula})")
            else:
                heavy = Chem.RemoveHs(ok)
                images.append(heavy)
                legends.append(Chem.MolToSmiles(heavy))
        image = Draw.MolsToGridImage(
            images, molsPerRow=mols_per_row, subImgSize=sub_image_size, legends=legends, returnPNG=False
        )
    image.save(str(path), format="PNG")
    return path
