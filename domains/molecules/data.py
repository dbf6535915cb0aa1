"""QM9 (Ramakrishnan et al. 2014) from the offline `qm9pack` CSVs: cached conversion, EDM splits, PyG dataset."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data

from domains.molecules.constants import (
    ATOMIC_NUMBERS,
    ELEMENTS,
    PROPERTIES,
    QM9_NUM_MOLECULES,
    PropertySpec,
)
from domains.molecules.egnn import fully_connected_edges
from domains.molecules.features import element_index
from multidiff.files import atomic_write
from multidiff.progress import progress_bar

__all__ = [
    "CONVERTER_VERSION",
    "FolderMolecules",
    "MoleculeDataWarning",
    "folder_split",
    "load_molecule_folder",
    "sync_molecule_folder",
    "PROPERTIES",
    "QM9",
    "QM9Dataset",
    "PropertyGivenN",
    "atom_count_histogram",
    "conditional_halves",
    "default_cache_dir",
    "edm_split",
    "load_qm9",
    "qm9_source_files",
    "reference_smiles",
    "property_spec",
    "source_hash",
]

CONVERTER_VERSION = "multidiff-qm9-csv-v1"
CACHE_FILE = "qm9.safetensors"
SOURCE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


@dataclass(frozen=True)
class QM9:
    """All QM9 molecules as flat CSR tensors: atoms of molecule m are rows ptr[m]:ptr[m+1] (Ramakrishnan et al. 2014)."""

    pos: Tensor  # [N_atoms, 3] float32, Angstrom (B3LYP/6-31G(2df,p) geometry)
    z: Tensor  # [N_atoms] int64 atomic numbers
    ptr: Tensor  # [M+1] int64 atom offsets
    properties: Tensor  # [M, P] float32 in the units of PROPERTIES
    property_names: list[str]
    smiles: list[str]  # SMILES as shipped in the source CSV
    index: Tensor  # [M] int64 original QM9 ids (1-based, gaps where molecules were excluded)

    def __len__(self) -> int:
        """Number of molecules."""
        return len(self.ptr) - 1

    @property
    def num_atoms(self) -> Tensor:
        """[M] atom count per molecule."""
        return self.ptr[1:] - self.ptr[:-1]

    def molecule(self, i: int) -> tuple[Tensor, Tensor]:
        """(positions [n, 3], atomic numbers [n]) of molecule i (0-based row, not the QM9 id)."""
        a, b = int(self.ptr[i]), int(self.ptr[i + 1])
        return self.pos[a:b], self.z[a:b]

    def property(self, name: str) -> Tensor:
        """[M] values of one property, e.g. "gap" in meV."""
        return self.properties[:, self.property_names.index(name)]


def default_cache_dir() -> Path:
    """$MULTIDIFF_CACHE, else ~/.cache/multidiff."""
    env = os.environ.get("MULTIDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "multidiff"


def qm9_source_files() -> list[Traversable]:
    """The QM9 CSV parts shipped inside the `qm9pack` wheel (read directly, not through its loader)."""
    root = files("qm9pack") / "data"
    return [root / name for name in SOURCE_FILES]


def source_hash(sources: Sequence[Traversable | Path]) -> str:
    """sha256 over the converter version and every source file's bytes (length-prefixed)."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    for src in sources:
        data = src.read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _parse_list(text: str) -> list[str]:
    """Items of a CSV cell like "['C','H']" or "[[1.0,2.0],[3.0,4.0]]", brackets and quotes removed."""
    return [t.strip().strip("'\"") for t in text.replace("[", "").replace("]", "").split(",") if t.strip()]


def _convert(sources: Sequence[Traversable | Path], progress: bool) -> dict[str, Tensor]:
    """Parse the QM9 CSVs into flat arrays (positions Angstrom; Hartree energies converted to meV)."""
    texts = [(str(src), src.read_bytes().decode("utf-8")) for src in sources]
    total = sum(max(t.count("\n") - 1, 0) for _, t in texts)
    pos_chunks: list[np.ndarray] = []
    z_list: list[int] = []
    counts: list[int] = []
    props: list[list[float]] = []
    smiles: list[str] = []
    index: list[int] = []
    columns = ["Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang"] + [p.column for p in PROPERTIES]
    with progress_bar("converting QM9", total, enabled=progress, eta=False) as bar:
        for name, text in texts:
            reader = csv.reader(io.StringIO(text, newline=""))
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{name}: empty QM9 CSV")
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{name}: missing columns {missing}")
            col = {c: header.index(c) for c in columns}
            for row_no, row in enumerate(reader, start=2):
                where = f"{name}, line {row_no}"
                elements = _parse_list(row[col["Elements"]])
                xyz = np.array(_parse_list(row[col["XYZ_Ang"]]), dtype=np.float64)
                n = int(row[col["N_atoms"]])
                if len(elements) != n or xyz.size != 3 * n:
                    raise ValueError(f"{where}: N_atoms={n} but {len(elements)} elements, {xyz.size} coordinates")
                try:
                    z_list.extend(ATOMIC_NUMBERS[e] for e in elements)
                except KeyError as err:
                    raise ValueError(f"{where}: element {err.args[0]} not in vocabulary {','.join(ELEMENTS)}") from None
                pos_chunks.append(xyz.reshape(n, 3))
                counts.append(n)
                props.append([float(row[col[p.column]]) * p.scale for p in PROPERTIES])
                smiles.append(row[col["SMILES"]])
                index.append(int(row[col["Index"]]))
                if len(counts) % 2000 == 0:
                    bar.update(completed=len(counts))
        bar.update(completed=len(counts), total=len(counts))
    if not counts:
        raise ValueError(f"no molecules in {[name for name, _ in texts]}")
    if np.any(np.diff(index) <= 0):  # EDM's split permutes rows in sorted QM9-id order
        raise ValueError("QM9 source rows are not strictly sorted by Index; EDM split indices would not match")
    smiles_bytes = [s.encode() for s in smiles]
    return {
        "pos": torch.from_numpy(np.concatenate(pos_chunks).astype(np.float32)),
        "z": torch.tensor(z_list, dtype=torch.int64),
        "ptr": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)),
        "properties": torch.tensor(props, dtype=torch.float32),
        "index": torch.tensor(index, dtype=torch.int64),
        "smiles_bytes": torch.frombuffer(bytearray(b"".join(smiles_bytes)), dtype=torch.uint8).clone(),
        "smiles_ptr": torch.from_numpy(np.concatenate([[0], np.cumsum([len(b) for b in smiles_bytes])]).astype(np.int64)),
    }


def _write_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """safetensors file written atomically (``multidiff.files.atomic_write``), readable by all like the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), durable=False, mode=0o644)


def _read_cache(path: Path, expected_hash: str) -> QM9 | None:
    """The cached QM9 if the file exists and its stored source hash matches, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("source_sha256") != expected_hash:
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
        names = json.loads(meta["property_names"])
    except Exception:  # unreadable / truncated cache: rebuild it
        return None
    raw = t["smiles_bytes"].numpy().tobytes()
    sp = t["smiles_ptr"].tolist()
    smiles = [raw[a:b].decode() for a, b in zip(sp[:-1], sp[1:])]
    return QM9(t["pos"], t["z"], t["ptr"], t["properties"], names, smiles, t["index"])


def load_qm9(
    cache_dir: Path | None = None,
    progress: bool = True,
    sources: Sequence[Traversable | Path] | None = None,
) -> QM9:
    """Load QM9 from the hash-checked tensor cache, converting the qm9pack CSVs once when needed."""
    sources = list(sources) if sources is not None else qm9_source_files()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILE
    digest = source_hash(sources)
    cached = _read_cache(path, digest)
    if cached is not None:
        return cached
    tensors = _convert(sources, progress)
    metadata = {
        "source_sha256": digest,
        "converter_version": CONVERTER_VERSION,
        "property_names": json.dumps([p.name for p in PROPERTIES]),
        "property_units": json.dumps([p.unit for p in PROPERTIES]),
    }
    _write_atomic(tensors, metadata, path)
    loaded = _read_cache(path, digest)
    if loaded is None:
        raise RuntimeError(f"QM9 cache {path} unreadable right after writing it")
    return loaded


def edm_split(num: int = QM9_NUM_MOLECULES) -> dict[str, np.ndarray]:
    """EDM/Cormorant QM9 split: seed-0 permutation, 100k train, 10% test, rest valid (Hoogeboom et al. 2022)."""
    n_train, n_test = 100_000, int(0.1 * num)
    n_valid = num - n_train - n_test
    if n_valid <= 0:
        raise ValueError(f"edm_split needs more than {n_train + n_test} molecules, got {num}")
    # RandomState(0) draws exactly what np.random.seed(0); np.random.permutation does, without global state.
    perm = np.random.RandomState(0).permutation(num)
    train, valid, test = np.split(perm, [n_train, n_train + n_valid])
    return {"train": train, "valid": valid, "test": test}


def conditional_halves(num_train: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """EDM conditional split of train (seed-42 permutation): (property-predictor half, generator half), train-relative."""
    perm = np.random.RandomState(42).permutation(num_train)
    half = num_train // 2
    return perm[:half], perm[half:]


_SPLIT_ALIASES = {"train_a": "predictor", "train_b": "generator"}


def _resolve_indices(num: int, split: str | Sequence[int] | np.ndarray | None) -> np.ndarray:
    """Row indices for None (all), "train"/"valid"/"test", "predictor"/"train_a", "generator"/"train_b", or an array."""
    if split is None:
        return np.arange(num)
    if isinstance(split, str):
        name = _SPLIT_ALIASES.get(split, split)
        splits = edm_split(num)
        if name in splits:
            return splits[name]
        if name in ("predictor", "generator"):
            predictor, generator = conditional_halves(len(splits["train"]))
            return splits["train"][predictor if name == "predictor" else generator]
        raise ValueError(f"unknown split {split!r}; expected train, valid, test, predictor/train_a, generator/train_b")
    idx = np.asarray(split, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        raise IndexError(f"split indices must lie in [0, {num})")
    return idx


class QM9Dataset(Dataset[Data]):
    """QM9 molecules as PyG Data(pos, z, one_hot, charges, y, num_nodes), EDM features unscaled (Hoogeboom et al. 2022)."""

    def __init__(
        self,
        qm9: QM9 | None = None,
        split: str | Sequence[int] | np.ndarray | None = None,
        fully_connected: bool = False,
        radius: float | None = None,
        cache_dir: Path | None = None,
        progress: bool = True,
    ) -> None:
        """Select `split` rows of `qm9` (loaded from the cache when None); edges when fully_connected or radius set."""
        self.qm9 = qm9 if qm9 is not None else load_qm9(cache_dir, progress)
        self.indices = _resolve_indices(len(self.qm9), split)
        self.fully_connected = fully_connected
        self.radius = radius

    def __len__(self) -> int:
        """Number of molecules in the split."""
        return len(self.indices)

    @property
    def num_atoms(self) -> np.ndarray:
        """[len] atom count per molecule of the split."""
        return self.qm9.num_atoms.numpy()[self.indices]

    def __getitem__(self, i: int) -> Data:
        """Molecule i of the split as a PyG Data object."""
        row = int(self.indices[i])
        pos, z = self.qm9.molecule(row)
        one_hot = torch.nn.functional.one_hot(element_index(z), len(ELEMENTS)).float()
        data = Data(
            pos=pos.clone(),
            z=z.clone(),
            one_hot=one_hot,
            charges=z.to(torch.float32).unsqueeze(-1),
            y=self.qm9.properties[row].unsqueeze(0).clone(),
            num_nodes=len(z),
            qm9_id=self.qm9.index[row : row + 1].clone(),
        )
        if self.fully_connected or self.radius is not None:
            data.edge_index = fully_connected_edges(torch.zeros(len(z), dtype=torch.long), pos=data.pos, radius=self.radius)
        return data


def atom_count_histogram(
    source: QM9 | QM9Dataset, indices: Sequence[int] | np.ndarray | None = None
) -> dict[int, int]:
    """{n_atoms: count} over a QM9Dataset, or over rows `indices` (default all) of a QM9 (EDM's n_nodes)."""
    if isinstance(source, QM9Dataset):
        counts = source.num_atoms if indices is None else source.num_atoms[np.asarray(indices)]
    else:
        counts = source.num_atoms.numpy()[_resolve_indices(len(source), indices)]
    values, freq = np.unique(counts, return_counts=True)
    return {int(v): int(f) for v, f in zip(values, freq)}


class PropertyGivenN:
    """p(properties | n_atoms) as in EDM: draw the properties of a random training molecule with n atoms."""

    def __init__(self, num_atoms: np.ndarray | Tensor, values: np.ndarray | Tensor, names: Sequence[str]) -> None:
        """Index the empirical property rows [M, P] by atom count [M]."""
        n = np.asarray(num_atoms, dtype=np.int64)
        v = torch.as_tensor(np.asarray(values, dtype=np.float32))
        if v.ndim != 2 or len(v) != len(n) or v.shape[1] != len(names):
            raise ValueError(f"values must be [{len(n)}, {len(names)}], got {tuple(v.shape)}")
        order = np.argsort(n, kind="stable")
        self.names = list(names)
        self.values = v[torch.from_numpy(order)]
        sorted_n = n[order]
        self._n, first = np.unique(sorted_n, return_index=True)
        self._start = dict(zip(self._n.tolist(), first.tolist()))
        self._count = dict(zip(self._n.tolist(), np.diff(np.append(first, len(n))).tolist()))

    @classmethod
    def from_qm9(
        cls, qm9: QM9, split: str | Sequence[int] | np.ndarray = "train", names: Sequence[str] | None = None
    ) -> PropertyGivenN:
        """Fit on the molecules of `split` (EDM uses the generator's training set) for the named properties."""
        idx = _resolve_indices(len(qm9), split)
        names = list(names) if names is not None else list(qm9.property_names)
        cols = [qm9.property_names.index(p) for p in names]
        return cls(qm9.num_atoms.numpy()[idx], qm9.properties[idx][:, cols].numpy(), names)

    @property
    def supported_n(self) -> list[int]:
        """Atom counts that have at least one training molecule."""
        return self._n.tolist()

    def sample(self, num_atoms: Sequence[int] | np.ndarray | Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[len(num_atoms), P] properties, row k drawn uniformly from training molecules with num_atoms[k] atoms."""
        ns = torch.as_tensor(num_atoms).reshape(-1).tolist()
        unknown = sorted({n for n in ns if n not in self._start})
        if unknown:
            raise ValueError(f"no training molecules with n_atoms in {unknown}; supported: {self.supported_n}")
        start = torch.tensor([self._start[n] for n in ns], dtype=torch.long)
        count = torch.tensor([self._count[n] for n in ns], dtype=torch.long)
        u = torch.rand(len(ns), generator=generator, dtype=torch.float64)
        offset = torch.minimum((u * count).long(), count - 1)
        return self.values[start + offset]


def reference_smiles(qm9: QM9, split: str | Sequence[int] | np.ndarray = "train") -> set[str]:
    """SMILES of `split` through EDM's own bond-inference pipeline, the novelty reference (~1 min for train)."""
    from domains.molecules.metrics import molecule_smiles

    idx = _resolve_indices(len(qm9), split)
    return {s for s in molecule_smiles([qm9.molecule(int(i)) for i in idx]) if s is not None}


def property_spec(name: str) -> PropertySpec:
    """The PROPERTIES entry (name, unit, source column, scale) for a property name."""
    for p in PROPERTIES:
        if p.name == name:
            return p
    raise KeyError(f"unknown property {name!r}; known: {[p.name for p in PROPERTIES]}")


# --- molecules from a folder of SDF / XYZ files (data.source=folder), with change data capture -------------------------

FOLDER_CACHE_KIND = "molecule_files"
FOLDER_CACHE_VERSION = "molecule-file-v1"  # bump when the per-file conversion below changes
FOLDER_EXTENSIONS = (".sdf", ".xyz")


class MoleculeDataWarning(UserWarning):
    """A molecule file of a data folder was skipped (malformed, outside the element vocabulary, overlapping atoms)."""


@dataclass(frozen=True)
class FolderMolecules(QM9):
    """The molecules of a folder of SDF / XYZ files in QM9's flat layout (no properties), with per-molecule keys
    ``relative/path.sdf#record`` (what the folder split hashes) and the prepared data's content ``version``."""

    keys: tuple[str, ...] = ()
    version: str = ""


def folder_split(keys: Sequence[str], split: str | None) -> np.ndarray:
    """Rows of ``split`` for folder molecules: a stable hash of each key puts 10 % in test, 10 % in valid, the rest in
    train ('all' or None: every row), so adding or removing files never moves the other molecules between splits."""
    if split in (None, "all"):
        return np.arange(len(keys))
    if split not in ("train", "valid", "test"):
        raise ValueError(f"data.split={split!r}: a data.source=folder set has the splits train, valid, test and all")
    bucket = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:4], "little") % 10 for k in keys], dtype=np.int64)
    keep = {"test": bucket == 0, "valid": bucket == 1, "train": bucket >= 2}[split]
    return np.flatnonzero(keep)


def _convert_file(path: Path) -> Any:
    """One SDF / XYZ file -> its molecules as flat tensors (pos [atoms, 3] float32, z [atoms], counts [molecules])."""
    from domains.molecules.io import MoleculeFormatError, read_sdf, read_xyz
    from multidiff.datacache import FileResult

    try:
        mols = read_sdf(path) if path.suffix.lower() == ".sdf" else read_xyz(path)
    except (MoleculeFormatError, OSError, UnicodeDecodeError) as err:
        return FileResult(None, {"skip": str(err)})
    pos = torch.from_numpy(np.concatenate([np.asarray(m.positions, dtype=np.float32) for m in mols]))
    z = torch.tensor([ATOMIC_NUMBERS[e] for m in mols for e in m.elements], dtype=torch.int64)
    counts = torch.tensor([len(m.elements) for m in mols], dtype=torch.int64)
    return FileResult({"pos": pos, "z": z, "counts": counts}, {"molecules": len(mols)})


def sync_molecule_folder(root: str | Path, *, rebuild: bool = False) -> Any:
    """Bring the prepared-data cache of a folder of ``*.sdf`` / ``*.xyz`` files (searched recursively, hidden
    entries skipped) in line with it: only added / changed files are parsed (`multidiff.datacache`)."""
    from multidiff.datacache import ContentIndexCache

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"molecule directory not found: {root} (data.root of data.source=folder)")
    files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
             if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    cache = ContentIndexCache.for_folder(FOLDER_CACHE_KIND, root, {"processing": FOLDER_CACHE_VERSION})
    return cache.sync(files, lambda rel, data: _convert_file(files[rel]), rebuild=rebuild)


def load_molecule_folder(root: str | Path, synced: Any = None) -> FolderMolecules:
    """The molecules of a folder (see `sync_molecule_folder`); skipped files are named in a `MoleculeDataWarning`."""
    import warnings

    synced = synced if synced is not None else sync_molecule_folder(root)
    keys: list[str] = []
    used: list[str] = []
    for rel in sorted(synced.entries):
        meta = synced.entries[rel]["meta"]
        if "skip" in meta:
            warnings.warn(f"skipping {Path(root) / rel}: {meta['skip']}", MoleculeDataWarning, stacklevel=2)
            continue
        used.append(rel)
        keys += [f"{rel}#{k + 1}" for k in range(meta["molecules"])]
    if not used:
        raise ValueError(f"no usable molecules in {root} ({len(synced.entries)} .sdf/.xyz files); expected SDF or XYZ "
                         f"files of molecules with elements {','.join(ELEMENTS)}")
    pos, z, counts = (synced.stack(name, used) for name in ("pos", "z", "counts"))
    m = len(counts)
    return FolderMolecules(
        pos=pos, z=z, ptr=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
        properties=torch.zeros(m, len(PROPERTIES)), property_names=[p.name for p in PROPERTIES], smiles=[""] * m,
        index=torch.arange(1, m + 1), keys=tuple(keys), version=synced.version)
