"""XYZ / SDF readers (with input validation) and SDF / XYZ / PNG writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rdkit import Chem
from rdkit.Chem import Draw

from domains.molecules import io as mol_io
from domains.molecules.data import QM9, edm_split, load_qm9
from domains.molecules.io import (
    MoleculeFormatError,
    read_sdf,
    read_xyz,
    write_png_grid,
    write_sdf,
    write_xyz,
)
from domains.molecules.metrics import Molecule, bond_orders, molecule_smiles

SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
PENTAVALENT = Molecule(
    np.array([[0.0, 0, 0], [1.09, 0, 0], [-1.09, 0, 0], [0, 1.09, 0], [0, -1.09, 0], [0, 0, 1.09]]),
    ("C", "H", "H", "H", "H", "H"),
)
WATER_XYZ = "3\nwater\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0\n"


@pytest.fixture(scope="module")
def sample() -> list[Molecule]:
    """30 QM9 test-split molecules as (positions, symbols)."""
    qm9: QM9 = load_qm9(progress=False)
    out = []
    for i in edm_split()["test"][:30]:
        pos, z = qm9.molecule(int(i))
        out.append(Molecule(pos.double().numpy(), tuple(SYMBOL[int(a)] for a in z)))
    return out


def test_sdf_round_trip(sample: list[Molecule], tmp_path: Path) -> None:
    mols = [*sample, PENTAVALENT]
    path = write_sdf(mols, tmp_path / "out.sdf")
    back = read_sdf(path)
    assert len(back) == len(mols)
    for a, b in zip(mols, back):
        assert b.elements == a.elements
        assert np.allclose(b.positions, a.positions, atol=5.1e-5)  # V2000 keeps 4 decimals
    # Bonds in the file are the inferred EDM bonds, also for the invalid (pentavalent) molecule.
    supplier = Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False)
    for a, rd in zip(mols, supplier):
        written = np.zeros((len(a.elements),) * 2, dtype=int)
        for bond in rd.GetBonds():
            i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            written[i, j] = written[j, i] = int(bond.GetBondTypeAsDouble())
        assert np.array_equal(written, bond_orders(*a))
    last = list(supplier)[-1]
    assert last.GetProp("valid") == "0" and last.GetNumBonds() == 5


def test_xyz_round_trip_multi_record(sample: list[Molecule], tmp_path: Path) -> None:
    path = write_xyz(sample[:5], tmp_path / "out.xyz")
    back = read_xyz(path)
    assert [m.elements for m in back] == [m.elements for m in sample[:5]]
    for a, b in zip(sample, back):
        assert np.allclose(a.positions, b.positions, atol=1e-9)


def test_xyz_blank_lines_extra_columns_atomic_numbers(tmp_path: Path) -> None:
    text = "\n" + WATER_XYZ + "\n\n2\n\n6 0 0 0 0.1\n1 1.09 0 0 extra\n"
    path = tmp_path / "m.xyz"
    path.write_text(text)
    mols = read_xyz(path)
    assert [m.elements for m in mols] == [("O", "H", "H"), ("C", "H")]
    assert np.allclose(mols[0].positions[1], [0.96, 0, 0])


def test_png_grid(sample: list[Molecule], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mols = [*sample[:6], PENTAVALENT]
    path = write_png_grid(mols, tmp_path / "grid.png", mols_per_row=4, sub_image_size=(200, 150))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (4 * 200, 2 * 150)
    # Legends: heavy-atom SMILES of valid molecules, a placeholder for the invalid one.
    seen: dict[str, list] = {}
    real = Draw.MolsToGridImage

    def spy(images: list, **kwargs: object) -> object:
        seen["images"], seen["legends"] = images, kwargs["legends"]
        return real(images, **kwargs)

    monkeypatch.setattr(mol_io.Draw, "MolsToGridImage", spy)
    write_png_grid(mols, tmp_path / "grid2.png")
    expected = [Chem.MolToSmiles(Chem.RemoveHs(Chem.MolFromSmiles(s))) for s in molecule_smiles(sample[:6])]
    assert seen["legends"][:6] == expected
    assert seen["legends"][6] == "invalid (H5C)" and seen["images"][6].GetNumAtoms() == 0


# ---- bad input --------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("reader, name", [(read_xyz, "e.xyz"), (read_sdf, "e.sdf")])
@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_empty_file(tmp_path: Path, reader, name: str, text: str) -> None:  # noqa: ANN001
    path = _write(tmp_path, name, text)
    with pytest.raises(MoleculeFormatError, match=rf"{name}: empty file, expected at least one"):
        reader(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("three\nc\nO 0 0 0\n", r"record 1 \(line 1\): malformed record, expected a positive atom count, got 'three'"),
        (WATER_XYZ + "4\nc\nC 0 0 0\nH 1.09 0 0\n", r"record 2 \(line 6\): malformed record, expected a comment line and 4 atom lines, file ends after 2"),
        (WATER_XYZ + "2\nc\nC 0 0 0\nH 1.09 zero 0\n", r"record 2, line 9: malformed record, expected 'element x y z'"),
        ("2\nc\nC 0 0\nH 1 0 0\n", r"record 1, line 3: malformed record, expected 'element x y z'"),
        ("2\nc\nC 0 0 nan\nH 1 0 0\n", r"record 1, line 3: .*finite coordinates"),
        ("0\nc\n", r"record 1 \(line 1\): malformed record, expected a positive atom count"),
    ],
)  # fmt: skip
def test_xyz_malformed(tmp_path: Path, text: str, pattern: str) -> None:
    path = _write(tmp_path, "bad.xyz", text)
    with pytest.raises(MoleculeFormatError, match=r"bad\.xyz, " + pattern):
        read_xyz(path)


def test_xyz_unknown_element(tmp_path: Path) -> None:
    path = _write(tmp_path, "cl.xyz", WATER_XYZ + "2\nHCl\nH 0 0 0\nCl 1.27 0 0\n")
    with pytest.raises(MoleculeFormatError, match=r"cl\.xyz, record 2, line 9: element Cl not in vocabulary H,C,N,O,F"):
        read_xyz(path)
    # A narrower vocabulary is honoured too.
    with pytest.raises(MoleculeFormatError, match="element O not in vocabulary H,C"):
        read_xyz(_write(tmp_path, "w.xyz", WATER_XYZ), vocabulary=("H", "C"))


def test_xyz_overlapping_atoms(tmp_path: Path) -> None:
    path = _write(tmp_path, "ov.xyz", WATER_XYZ + "3\nc\nC 0 0 0\nH 1.09 0 0\nH 1.09 0.05 0\n")
    with pytest.raises(MoleculeFormatError, match=r"ov\.xyz, record 2 \(line 6\): atoms 2 and 3 are 0\.050 A apart \(atoms on top of each other"):
        read_xyz(path)


def _sdf_text(mols: list[Molecule], tmp_path: Path) -> str:
    return write_sdf(mols, tmp_path / "tmp_src.sdf").read_text()


def test_sdf_malformed_record(sample: list[Molecule], tmp_path: Path) -> None:
    good = _sdf_text(sample[:1], tmp_path)
    n_lines = len(good.splitlines())
    bad = good + "broken\n  RDKit\n\n  x  y  0  0  0  0  0  0  0  0999 V2000\nM  END\n$$$$\n"
    path = _write(tmp_path, "bad.sdf", bad)
    with pytest.raises(MoleculeFormatError, match=rf"bad\.sdf, record 2 \(line {n_lines + 1}\): malformed record, expected an MDL molfile"):
        read_sdf(path)


def test_sdf_unknown_element(sample: list[Molecule], tmp_path: Path) -> None:
    text = _sdf_text(sample[:2], tmp_path)
    head, sep, tail = text.partition("$$$$\n")
    tail = tail.replace(" O   0", " Cl  0", 1) if " O   0" in tail else tail.replace(" C   0", " Cl  0", 1)
    path = _write(tmp_path, "cl.sdf", head + sep + tail)
    with pytest.raises(MoleculeFormatError, match=r"cl\.sdf, record 2 \(line \d+\), atom \d+: element Cl not in vocabulary H,C,N,O,F"):
        read_sdf(path)


def test_sdf_overlapping_atoms(tmp_path: Path) -> None:
    mol = Molecule(np.array([[0.0, 0, 0], [0.05, 0, 0], [1.0, 0, 0]]), ("C", "H", "H"))
    path = write_sdf([mol], tmp_path / "ov.sdf")
    with pytest.raises(MoleculeFormatError, match=r"ov\.sdf, record 1 \(line 1\): atoms 1 and 2 are 0\.050 A apart"):
        read_sdf(path)
    assert issubclass(MoleculeFormatError, ValueError)


def test_binary_file_is_named_not_decoded(sample: list[Molecule], tmp_path: Path) -> None:
    blob = tmp_path / "binary.sdf"
    blob.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MoleculeFormatError, match=r"binary\.sdf: not a text SDF file: binary data \(byte 0x00 at offset 0\)"):
        read_sdf(blob)
    xyz = tmp_path / "binary.xyz"
    xyz.write_bytes(b"3\nwater\nO 0 0 0\x00\xff\xfe")
    with pytest.raises(MoleculeFormatError, match=r"binary\.xyz: not a text XYZ file: binary data \(byte 0x00 at offset 15\)"):
        read_xyz(xyz)
    import gzip

    gz = tmp_path / "zipped.sdf"
    gz.write_bytes(gzip.compress(_sdf_text(sample[:2], tmp_path).encode()))
    with pytest.raises(MoleculeFormatError, match=r"zipped\.sdf: not a text SDF file.*gzip-compressed: decompress it first"):
        read_sdf(gz)
    # Latin-1 text (not UTF-8) in a title or property line is still text
    latin = tmp_path / "latin.sdf"
    latin.write_bytes(_sdf_text(sample[:1], tmp_path).replace("molecule 0", "mol\u00e9cule", 1).encode("latin-1"))
    assert len(read_sdf(latin)) == 1
    latin_xyz = tmp_path / "latin.xyz"
    latin_xyz.write_bytes(WATER_XYZ.replace("water", "eau \u00e0 25 \u00b0C").encode("latin-1"))
    assert len(read_xyz(latin_xyz)) == 1


def test_absurd_coordinates_are_rejected(sample: list[Molecule], tmp_path: Path) -> None:
    path = _write(tmp_path, "far.xyz", WATER_XYZ + "2\nc\nC 0 0 0\nH 1e30 0 0\n")
    with pytest.raises(MoleculeFormatError, match=r"far\.xyz, record 2, line 9: coordinate 1e\+30 A is not a molecule's"):
        read_xyz(path)
    assert len(read_xyz(_write(tmp_path, "ok.xyz", "2\nc\nC 999 0 0\nH 1000 0 0\n"))) == 1  # a PDB-like frame is fine
    lines = _sdf_text(sample[:1], tmp_path).splitlines()
    lines[5] = "  100000.0" + lines[5][10:]  # the second atom's x in the V2000 atom block
    path = _write(tmp_path, "far.sdf", "\n".join(lines) + "\n")
    with pytest.raises(MoleculeFormatError, match=r"far\.sdf, record 1 \(line 1\), atom 2: coordinate x = 100000 A "
                                                  r"is not a molecule's"):
        read_sdf(path)
