"""The molecules domain: E(3)-equivariant diffusion of QM9 molecules (Hoogeboom et al. 2022, EDM).

Each atom is one row ``[position (3, Angstrom) | one-hot element * 0.25 (5) | atomic number * 0.1 (1)]``
(EDM's feature scaling). Positions live in the zero-centre-of-mass subspace of each molecule, features
are unconstrained (``MolSpace``). The backbone is ``EGNNDenoiser``; conditions are QM9 properties
normalised by the training mean / mean absolute deviation, ``cond = {"properties": [B, P]}``.

Fragment completion (``--inpaint fragment.sdf``): the fragment's atoms are the first rows of every
molecule and are kept by ``multidiff.guidance.Inpaint``. Sampling then runs in the *fragment frame*
(``FragmentFrame``): positions are taken modulo translation, with the gauge fixed by putting the
fragment's centroid at the origin instead of the molecule's centre of mass. The projection never moves
the fragment rows, so they stay exactly where they are given, while the new atoms are free to sit on
any side of the fragment (fixing the fragment in the zero-CoM frame instead would force the centroid
of the new atoms onto the fragment's centroid). The eps-predicting EGNN is translation equivariant,
D(x + alpha c) = D(x) + c, and its predicted noise is projected into the same fragment frame as the
sampler's noise (``MolEGNN``'s ``anchor`` kwarg), so the gauge change is exact. ``decode`` shifts the
fragment frame back: the fragment atoms come out at their input coordinates (up to float32 rounding).

    multidiff data molecules                                  # convert / cache QM9, split sizes
    multidiff train molecules --config fast --max-minutes 20 --out runs/mol
    multidiff sample molecules --checkpoint runs/mol --num 100 --steps 50 --out samples/mol
    multidiff sample molecules --checkpoint runs/cond --condition alpha=80 --guidance 2
    multidiff sample molecules --inpaint fragment.sdf --condition n=15
    multidiff evaluate molecules samples/mol
    multidiff sample molecules data.predictor=data/checkpoints/molecules_alpha_predictor.safetensors \
        --condition alpha=60 --gradient-scale 3                   # steer with the property predictor
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from domains.molecules.constants import (
    ATOMIC_NUMBERS,
    CHARGE_SCALE,
    ELEMENTS,
    ONE_HOT_SCALE,
    PROPERTY_NAMES,
    PROPERTY_UNITS,
)
from domains.molecules.features import atom_rows, num_features
from domains.molecules.fragment import FragmentFrame
from multidiff.config import positive
from multidiff.files import atomic_write
from multidiff.registry import Domain, RunConfig, SampleRequest, read_run
from multidiff.spaces import Categorical, Graph, Product, Space, ZeroCoM

__all__ = [
    "MolData",
    "MolModel",
    "MolSpace",
    "FragmentFrame",
    "MolGraphs",
    "MolSamples",
    "MoleculesDomain",
    "PredictorLoss",
    "atom_rows",
]

MAX_ATOMS = 29  # the largest QM9 molecule (with hydrogens)
SAMPLES_FILE = "molecules.sdf"
SAMPLES_XYZ = "molecules.xyz"
PNG_LIMIT = 64  # molecules drawn in the PNG grid


@dataclass
class MolData:
    """QM9 selection and conditioning; the ``n_atoms_counts`` / ``property_*`` stats are filled in at training."""

    # qm9: QM9 from the qm9pack wheel (EDM's splits); folder: the *.sdf / *.xyz files under data.root (no properties,
    # splits by a hash of file and record), prepared with change data capture (multidiff.datacache)
    source: Literal["qm9", "folder"] = "qm9"
    root: str | None = None  # data.source=folder: the directory of molecule files
    split: str | None = None  # None: "generator" half when conditioning (EDM), "predictor" half for a predictor, else "train"
    max_molecules: int | None = positive(None)  # first N molecules of the split (the split is a random permutation)
    remove_h: bool = False
    include_charges: bool = True
    # continuous: one-hot * 0.25 diffused like positions (EDM); categorical: a discrete part (multidiff.categorical),
    # unscaled one-hot rows with cross-entropy, needs include_charges: false (the charge is the element's)
    atom_types: Literal["continuous", "categorical"] = "continuous"
    conditioning: list[str] = field(default_factory=list)  # property names: alpha, gap, homo, lumo, mu, Cv
    radius: float | None = None  # EGNN interaction cut-off in Angstrom (None: fully connected)
    cache_dir: Path | None = None  # QM9 tensor cache; None: $MULTIDIFF_CACHE or ~/.cache/multidiff
    novelty: bool = False  # evaluate: compute novelty (builds the cached training SMILES once, ~1 min)
    predictor: str | None = None  # property-predictor run/checkpoint: property MAE in evaluate, --gradient-scale targets
    # Written by training into the run config, so that sampling needs only the checkpoint:
    n_atoms_counts: list[int] = field(default_factory=list)  # [n] = training molecules with n atoms
    property_mean: list[float] = field(default_factory=list)
    property_mad: list[float] = field(default_factory=list)


@dataclass
class MolModel:
    """EGNN width/depth (EDM: hidden 256, 9 layers, 1 sublayer), or the property predictor (``kind: predictor``)."""

    kind: Literal["denoiser", "predictor"] = "denoiser"
    hidden: int = positive(256)
    layers: int = positive(9)
    sublayers: int = positive(1)
    attention: bool = True
    tanh: bool = True
    coords_range: float = positive(15.0)
    norm_constant: float = 1.0
    normalization_factor: float = 1.0
    predictor_pool: Literal["sum", "mean"] = "sum"


def one_hot_scale(data: MolData) -> float:
    """The one-hot scale of the atom rows: EDM's 0.25 for continuous atom types, 1 for a categorical part."""
    return 1.0 if data.atom_types == "categorical" else ONE_HOT_SCALE


def check_atom_types(data: MolData) -> None:
    """A categorical atom-type part holds exactly the one-hot columns: no separate charge column."""
    if data.atom_types not in ("continuous", "categorical"):
        raise ValueError(f"data.atom_types: expected 'continuous' or 'categorical', got {data.atom_types!r}")
    if data.atom_types == "categorical" and data.include_charges:
        raise ValueError("data.atom_types=categorical needs data.include_charges=false (a categorical part is the "
                         "one-hot element columns alone; the charge follows from the element)")


# --- spaces ---------------------------------------------------------------------------------------------------------


class MolSpace(Product):
    """Positions x features of a graph batch: ``[0:3]`` in a position space (ZeroCoM), ``[3:]`` unconstrained."""

    def __init__(self, batch: Tensor, num_graphs: int | None = None, positions: Graph | None = None,
                 categorical: bool = False) -> None:
        graph = Graph(batch, num_graphs)
        features: Space = Categorical(len(ELEMENTS), graph) if categorical else graph
        positions = positions if positions is not None else ZeroCoM(batch, graph.num_samples)
        super().__init__([(slice(0, 3), positions), (slice(3, None), features)])
        self.positions = positions


def _egnn_class() -> type:
    """``MolEGNN`` (imported lazily: torch_geometric is slow to import)."""
    from domains.molecules.egnn import MolEGNN

    return MolEGNN


# --- data -----------------------------------------------------------------------------------------------------------


class MolGraphs(Dataset):
    """Molecules of one QM9 split as ``(positions, atomic numbers, properties)`` views of the flat tensors."""

    def __init__(self, qm9: Any, rows: np.ndarray, remove_h: bool = False) -> None:
        self.qm9, self.rows, self.remove_h = qm9, np.asarray(rows, dtype=np.int64), remove_h

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        row = int(self.rows[i])
        pos, z = self.qm9.molecule(row)
        if self.remove_h:
            heavy = z != 1
            pos, z = pos[heavy], z[heavy]
        return pos, z, self.qm9.properties[row]

    def num_atoms(self) -> np.ndarray:
        """[len] atoms per molecule (after removing hydrogens when asked)."""
        if not self.remove_h:
            return self.qm9.num_atoms.numpy()[self.rows]
        heavy = (self.qm9.z != 1).long()
        per_mol = torch.zeros(len(self.qm9), dtype=torch.long).index_add_(
            0, torch.repeat_interleave(torch.arange(len(self.qm9)), self.qm9.num_atoms), heavy)
        return per_mol.numpy()[self.rows]


@dataclass
class MolSamples:
    """Decoded molecules (positions in Angstrom, element symbols) and the conditions they were asked for."""

    molecules: list[Any]
    properties: dict[str, list[float]] = field(default_factory=dict)


class PredictorLoss(nn.Module):
    """L1 loss of ``EGNNPredictor`` on normalised properties (EDM's property classifier, Hoogeboom et al. 2022)."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, batch: dict[str, Any]) -> Tensor:
        x = batch["x"].clone()
        x[:, :3] = ZeroCoM(batch["batch"], batch["num_graphs"]).project(x[:, :3])
        pred = self.predictor(x, batch["batch"], batch["num_graphs"])
        return (pred - batch["properties"]).abs().mean()


# --- the domain -----------------------------------------------------------------------------------------------------


MolConfig = RunConfig[MolData, MolModel]


class MoleculesDomain(Domain[MolData, MolModel]):
    """3D molecules (QM9): EGNN denoiser on [positions | atom types], zero-CoM noise (Hoogeboom et al. 2022)."""

    name = "molecules"
    description = "3D molecules from QM9 with an E(3)-equivariant EGNN (EDM, Hoogeboom et al. 2022)"
    DataConfig = MolData
    ModelConfig = MolModel
    output_patterns = (SAMPLES_FILE, SAMPLES_XYZ, "molecules.png")
    default_recipe = "qm9"
    # Predictor guidance moves each coordinate by at most 0.3 (Angstrom for positions) per denoiser call: without a
    # bound a few molecules fly apart (pushing atoms apart raises alpha, and the predictor's gradient grows with it).
    guidance_clip = 0.3

    def __init__(self) -> None:
        self._qm9: Any = None
        self._qm9_key: Any = None
        self._predictors: dict[str, Any] = {}
        self._given_n: dict[tuple[Any, ...], Any] = {}
        self._baselines: dict[tuple[str, int | None], dict[str, dict[str, float]]] = {}

    # --- data -----------------------------------------------------------------------------------------------------
    def qm9(self, data: MolData) -> Any:
        """QM9 from the tensor cache (converted from the qm9pack CSVs on first use)."""
        from domains.molecules.data import load_molecule_folder, load_qm9, sync_molecule_folder

        if data.source == "folder":
            if not data.root:
                raise ValueError("data.root is required for data.source=folder (a directory of .sdf / .xyz files)")
            synced = sync_molecule_folder(data.root)  # a stat per file; parses only added / changed files
            key = ("folder", str(synced.cache.directory), synced.version)
            if self._qm9 is None or self._qm9_key != key:
                self._qm9, self._qm9_key = load_molecule_folder(data.root, synced), key
            return self._qm9
        key = str(data.cache_dir)
        if self._qm9 is None or self._qm9_key != key:
            self._qm9, self._qm9_key = load_qm9(data.cache_dir, progress=True), key
        return self._qm9

    def _split(self, cfg: MolConfig) -> str:
        """The configured split, or EDM's choice: generator half when conditioning, predictor half for predictors."""
        if cfg.data.split is not None:
            return cfg.data.split
        if cfg.model.kind == "predictor":
            return "predictor"
        return "generator" if cfg.data.conditioning else "train"

    def _rows(self, cfg: MolConfig, split: str) -> np.ndarray:
        from domains.molecules.data import _resolve_indices, folder_split

        qm9 = self.qm9(cfg.data)
        rows = folder_split(qm9.keys, split) if cfg.data.source == "folder" else _resolve_indices(len(qm9), split)
        if cfg.data.max_molecules is not None:
            if cfg.data.max_molecules < 1:
                raise ValueError(f"data.max_molecules must be >= 1 or null, got {cfg.data.max_molecules}")
            rows = rows[: cfg.data.max_molecules]
        return rows

    def _check_conditioning(self, data: MolData) -> None:
        if data.source == "folder" and data.conditioning:
            raise ValueError(f"data.conditioning={data.conditioning}: a data.source=folder set has no properties to "
                             f"condition on (use data.source=qm9, or no conditioning)")
        unknown = [p for p in data.conditioning if p not in PROPERTY_NAMES]
        if unknown:
            raise ValueError(f"data.conditioning: unknown propert{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                             f"valid: {list(PROPERTY_NAMES)}")
        if len(set(data.conditioning)) != len(data.conditioning):
            raise ValueError(f"data.conditioning: duplicate property names in {data.conditioning}")

    def resolve(self, cfg: MolConfig) -> MolConfig:
        """``cfg`` with the training atom-count histogram and the property mean/MAD filled into ``data`` (they travel
        with the checkpoint, so sampling needs no data set); validated. Pure: a new config when something is
        filled, ``cfg`` itself when the stats are there already (a loaded checkpoint)."""
        data = cfg.data
        self._check_conditioning(data)
        check_atom_types(data)
        p = len(data.conditioning)
        has_stats = len(data.property_mean) == p and len(data.property_mad) == p
        if data.n_atoms_counts and has_stats:
            return cfg
        ds = MolGraphs(self.qm9(data), self._rows(cfg, self._split(cfg)), data.remove_h)
        filled: dict[str, Any] = {}
        if not data.n_atoms_counts:
            filled["n_atoms_counts"] = np.bincount(ds.num_atoms(), minlength=MAX_ATOMS + 1).astype(int).tolist()
        if not has_stats:
            qm9 = self.qm9(data)
            cols = [qm9.property_names.index(name) for name in data.conditioning]
            values = qm9.properties[torch.from_numpy(ds.rows)][:, cols].to(torch.float64)
            mean = values.mean(0)
            mad = (values - mean).abs().mean(0)
            filled["property_mean"] = [float(v) for v in mean]
            filled["property_mad"] = [float(v) if v > 0 else 1.0 for v in mad]
        return dataclasses.replace(cfg, data=dataclasses.replace(data, **filled))

    def build_dataset(self, cfg: MolConfig, split: str = "train") -> Dataset:
        self._check_conditioning(cfg.data)
        check_atom_types(cfg.data)
        name = self._split(cfg) if split == "train" else split
        graphs = MolGraphs(self.qm9(cfg.data), self._rows(cfg, name), cfg.data.remove_h)
        graphs.data_version = getattr(self.qm9(cfg.data), "version", None)  # type: ignore[attr-defined]  # in the run log
        return graphs

    def collate_fn(self, cfg: MolConfig) -> Callable[[list[tuple[Tensor, Tensor, Tensor]]], dict[str, Any]]:
        """(positions, atomic numbers, properties) items -> a graph batch ``{x, categorical, batch, num_graphs
        [, properties]}``: atom rows in the config's feature layout, properties normalised by the resolved
        mean / MAD (``resolve`` first when conditioning)."""
        data = cfg.data
        check_atom_types(data)
        include_charges, categorical = data.include_charges, data.atom_types == "categorical"
        scale = one_hot_scale(data)
        cols = [PROPERTY_NAMES.index(name) for name in data.conditioning]
        if cols and (len(data.property_mean) != len(cols) or len(data.property_mad) != len(cols)):
            raise ValueError(f"molecules: data.conditioning={data.conditioning} needs the property mean/MAD of the "
                             f"training set in data.property_mean / property_mad: resolve the config first "
                             f"(cfg = domain.resolve(cfg))")
        mean = torch.tensor(data.property_mean, dtype=torch.float32)
        mad = torch.tensor(data.property_mad, dtype=torch.float32)

        def collate(items: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Any]:
            counts = torch.tensor([len(z) for _, z, _ in items], dtype=torch.long)
            pos = torch.cat([p for p, _, _ in items])
            z = torch.cat([z for _, z, _ in items])
            batch = {
                "x": atom_rows(pos, z, include_charges, scale),
                "categorical": categorical,
                "batch": torch.repeat_interleave(torch.arange(len(items)), counts),
                "num_graphs": len(items),
            }
            if cols:
                props = torch.stack([y for _, _, y in items])[:, cols]
                batch["properties"] = (props - mean) / mad
            return batch

        return collate

    # --- model ----------------------------------------------------------------------------------------------------
    def build_backbone(self, cfg: MolConfig) -> nn.Module:
        if cfg.model.kind != "denoiser":
            raise ValueError(f"model.kind={cfg.model.kind!r}: a property-predictor run has no denoiser to sample from")
        m = cfg.model
        return _egnn_class()(
            num_features(cfg.data), hidden=m.hidden, layers=m.layers, sublayers=m.sublayers,
            cond_dim=len(cfg.data.conditioning), attention=m.attention, tanh=m.tanh, coords_range=m.coords_range,
            norm_constant=m.norm_constant, radius=cfg.data.radius, normalization_factor=m.normalization_factor,
            # an x0-predicting model outputs coordinates; eps / v / velocity models a displacement from the input
            position_output="coordinates" if cfg.diffusion.target == "x0" else "displacement",
            self_conditioning=cfg.diffusion.self_condition > 0,
        )

    def coupling(self, cfg: MolConfig) -> Any:
        """``diffusion.coupling: equivariant_ot``: Hungarian + Kabsch alignment of each noise draw (``equivariant_ot``)."""
        name = cfg.diffusion.coupling
        if name is None:
            return None
        if name != "equivariant_ot":
            raise ValueError(f"diffusion.coupling={name!r}: unknown coupling for molecules; expected 'equivariant_ot' or null")
        from domains.molecules.coupling import equivariant_ot

        return equivariant_ot

    def training_module(self, cfg: MolConfig) -> nn.Module | None:
        """``model.kind: predictor`` trains EDM's property predictor (L1 on normalised properties) instead."""
        if cfg.model.kind != "predictor":
            return None
        from domains.molecules.egnn import EGNNPredictor

        if not cfg.data.conditioning:
            raise ValueError("model.kind=predictor needs data.conditioning: the properties to predict (e.g. [alpha])")
        m = cfg.model
        return PredictorLoss(EGNNPredictor(num_features(cfg.data), len(cfg.data.conditioning), hidden=m.hidden,
                                           layers=m.layers, attention=m.attention, pool=m.predictor_pool,
                                           radius=cfg.data.radius, normalization_factor=m.normalization_factor))

    def unpack(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor] | None, dict[str, Any]]:
        cond = {"properties": batch["properties"]} if "properties" in batch else None
        return batch["x"], cond, {"batch": batch["batch"]}

    def space(self, batch: dict[str, Any]) -> Space:
        return MolSpace(batch["batch"], batch["num_graphs"], categorical=batch.get("categorical", False))

    def prepare_data(self, cfg: MolConfig) -> dict[str, Any]:
        """Convert / cache QM9, report split sizes (and build the novelty reference when ``data.novelty``)."""
        from domains.molecules.data import conditional_halves, edm_split

        self._check_conditioning(cfg.data)
        if cfg.data.source == "folder":
            from domains.molecules.data import sync_molecule_folder

            changes = sync_molecule_folder(cfg.data.root or "").changes if cfg.data.root else None
            qm9 = self.qm9(cfg.data)
            return {"source": "folder", "root": cfg.data.root, "changes": changes, "molecules": len(qm9),
                    "atoms": int(qm9.num_atoms.sum()),
                    **{k: len(self._rows(cfg, k)) for k in ("train", "valid", "test")}}
        qm9 = self.qm9(cfg.data)
        splits = edm_split(len(qm9))
        pred, gen = conditional_halves(len(splits["train"]))
        summary: dict[str, Any] = {
            "molecules": len(qm9), "atoms": int(qm9.num_atoms.sum()),
            **{k: len(v) for k, v in splits.items()}, "predictor": len(pred), "generator": len(gen),
            "selected_split": self._split(cfg), "selected": len(self._rows(cfg, self._split(cfg))),
        }
        if cfg.data.novelty:
            summary["reference_smiles"] = len(self.reference_smiles(cfg.data))
        return summary

    def reference_smiles(self, data: MolData) -> set[str]:
        """SMILES of the EDM training split (the novelty reference), cached as a text file in the cache dir."""
        from domains.molecules.data import reference_smiles

        path = self._smiles_cache(data)
        if path.is_file():
            return set(path.read_text().split())
        smiles = reference_smiles(self.qm9(data), "train")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "\n".join(sorted(smiles)) + "\n", durable=False)
        return smiles

    @staticmethod
    def _smiles_cache(data: MolData) -> Path:
        from domains.molecules.data import CONVERTER_VERSION, default_cache_dir

        root = Path(data.cache_dir) if data.cache_dir is not None else default_cache_dir()
        return root / f"qm9_train_smiles.{CONVERTER_VERSION}.txt"

    # --- sampling -------------------------------------------------------------------------------------------------
    def request(self, cfg: MolConfig, num: int, conditions: dict[str, str], inpaint: Path | None = None,
                mask: str | None = None, seed: int = 0) -> SampleRequest:
        data = cfg.data
        if num < 1:
            raise ValueError(f"molecules: --num must be >= 1, got {num}")
        if mask is not None:
            raise ValueError("molecules: --mask is not used; with --inpaint FRAGMENT the fragment's atoms are kept "
                             "and the others generated (set their number with --condition n=N)")
        guided = [] if data.predictor is None else [
            k for k in self.predictor(data).names if k not in data.conditioning]
        valid = ["n", *data.conditioning, *guided]
        unknown = [k for k in conditions if k not in valid]
        if unknown:
            hint = (" (this model is unconditional; train with data.conditioning to condition on properties, or set "
                    "data.predictor to steer toward them with --gradient-scale)" if not valid[1:] else "")
            raise ValueError(f"molecules: unknown condition(s) {unknown}; valid: {valid}{hint}")
        targets = [*data.conditioning, *(k for k in guided if k in conditions)]
        g = torch.Generator().manual_seed(seed)
        fragment = self._read_fragment(inpaint) if inpaint is not None else None
        n_frag = len(fragment[1]) if fragment is not None else 0
        counts = torch.tensor(data.n_atoms_counts, dtype=torch.float64)
        if counts.numel() == 0 or counts.sum() <= 0:
            raise ValueError("molecules: the run config has no atom-count histogram (data.n_atoms_counts); "
                             "was the checkpoint written by `multidiff train molecules`?")
        if "n" in conditions:
            try:
                n = int(conditions["n"])
            except ValueError:
                raise ValueError(f"molecules: n must be an integer number of atoms, got {conditions['n']!r}") from None
            lo = max(n_frag, 1)
            if not lo <= n <= MAX_ATOMS:
                what = f" (the fragment {inpaint} has {n_frag} atoms)" if fragment is not None else ""
                raise ValueError(f"molecules: n={n} out of range {lo}..{MAX_ATOMS}{what}")
            sizes = torch.full((num,), n, dtype=torch.long)
        else:
            allowed = counts.clone()
            allowed[: n_frag + 1] = 0  # completion adds at least one atom
            if allowed.sum() <= 0:
                raise ValueError(f"molecules: {inpaint} has {n_frag} atoms; no training molecule is larger")
            sizes = torch.multinomial(allowed, num, replacement=True, generator=g)
        batch = torch.repeat_interleave(torch.arange(num), sizes)
        cond, props = self._properties(cfg, targets, conditions, sizes, g)
        nf = num_features(data)
        like = torch.zeros(int(sizes.sum()), 3 + nf)
        meta: dict[str, Any] = {"sizes": sizes, "properties": props, "include_charges": data.include_charges}
        check_atom_types(data)
        categorical = data.atom_types == "categorical"
        if fragment is None:
            return SampleRequest(like=like, space=MolSpace(batch, num, categorical=categorical), cond=cond, kwargs={"batch": batch},
                                 batched_cfg=False, meta=meta)
        pos, z = fragment
        centroid = pos.mean(0)
        rows = atom_rows(pos - centroid, z, data.include_charges, one_hot_scale(data))
        first = torch.cumsum(sizes, 0) - sizes
        local = torch.arange(len(batch)) - first[batch]
        anchor = local < n_frag
        known = like.clone()
        known[anchor] = rows.repeat(num, 1)
        space = MolSpace(batch, num, positions=FragmentFrame(batch, anchor, num), categorical=categorical)
        meta.update(fragment_centroid=centroid, fragment_atoms=n_frag, fragment=str(inpaint))
        return SampleRequest(like=like, space=space, cond=cond, kwargs={"batch": batch, "anchor": anchor}, known=known,
                             mask=anchor.unsqueeze(-1).expand_as(known).clone(), batched_cfg=False, meta=meta)

    def _read_fragment(self, path: Path) -> tuple[Tensor, Tensor]:
        """The single molecule of an SDF/XYZ fragment file as (positions float32 [n, 3], atomic numbers [n])."""
        from domains.molecules.io import read_sdf, read_xyz

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: fragment file not found")
        suffix = path.suffix.lower()
        if suffix not in (".sdf", ".mol", ".xyz"):
            raise ValueError(f"{path}: unknown fragment format {suffix or '(no suffix)'}; expected .sdf, .mol or .xyz")
        mols = read_xyz(path) if suffix == ".xyz" else read_sdf(path)
        if len(mols) != 1:
            raise ValueError(f"{path}: expected one fragment molecule, found {len(mols)} records")
        mol = mols[0]
        if len(mol.elements) > MAX_ATOMS - 1:
            raise ValueError(f"{path}: fragment has {len(mol.elements)} atoms; at most {MAX_ATOMS - 1} fit a QM9-sized molecule")
        z = torch.tensor([ATOMIC_NUMBERS[s] for s in mol.elements], dtype=torch.long)
        return torch.as_tensor(mol.positions, dtype=torch.float32), z

    def _properties(self, cfg: MolConfig, names: list[str], conditions: dict[str, str], sizes: Tensor,
                    g: torch.Generator) -> tuple[dict[str, Tensor] | None, dict[str, list[float]]]:
        """Target properties per molecule: given values, else drawn from p(property | n) of the training set (EDM).

        ``names`` are the model's conditioning properties followed by gradient-guidance-only targets; the
        model's condition tensor holds the former, normalised by the training mean / MAD.
        """
        data = cfg.data
        if not names:
            return None, {}
        given: dict[str, float] = {}
        for name in names:
            if name in conditions:
                try:
                    given[name] = float(conditions[name])
                except ValueError:
                    raise ValueError(f"molecules: {name} must be a number in {PROPERTY_UNITS[name]}, got {conditions[name]!r}") from None
                if not math.isfinite(given[name]):
                    raise ValueError(f"molecules: {name} must be finite, got {conditions[name]!r}")
        num = len(sizes)
        values = torch.zeros(num, len(names), dtype=torch.float64)
        if len(given) < len(names):
            model = self._property_given_n(cfg, names)
            supported = set(model.supported_n)
            # sizes outside the training support (e.g. n=29 with few molecules) borrow the nearest supported n
            near = torch.tensor([min(supported, key=lambda s: (abs(s - int(n)), s)) for n in sizes])
            values = model.sample(near, generator=g).to(torch.float64)
        for k, name in enumerate(names):
            if name in given:
                values[:, k] = given[name]
        props = {name: values[:, k].tolist() for k, name in enumerate(names)}
        if not data.conditioning:
            return None, props
        mean = torch.tensor(data.property_mean, dtype=torch.float32)
        mad = torch.tensor(data.property_mad, dtype=torch.float32)
        cond = {"properties": ((values[:, : len(data.conditioning)] - mean) / mad).to(torch.float32)}
        return cond, props

    def _property_given_n(self, cfg: MolConfig, names: list[str]) -> Any:
        """p(properties | n) of the configured training split, built once per (split, size, names) and reused by chunks."""
        from domains.molecules.data import PropertyGivenN

        key = (self._split(cfg), cfg.data.max_molecules, str(cfg.data.cache_dir), tuple(names))
        if key not in self._given_n:
            self._given_n[key] = PropertyGivenN.from_qm9(self.qm9(cfg.data), self._rows(cfg, key[0]), names)
        return self._given_n[key]

    # --- property predictor: gradient guidance and EDM's property MAE -------------------------------------------
    def load_predictor(self, path: Path | str, device: str = "cpu") -> Any:
        """The ``PropertyPredictor`` of a ``multidiff train molecules --config property_predictor`` run or checkpoint."""
        from domains.molecules.properties import predictor_from_run
        from multidiff.checkpoint import load_checkpoint_for_sampling

        ckpt = load_checkpoint_for_sampling(Path(path).expanduser())
        raw = ckpt.config
        if raw.get("domain") != self.name or (raw.get("model") or {}).get("kind") != "predictor":
            raise ValueError(f"{ckpt.path}: not a molecular property predictor (expected a run of "
                             f"`multidiff train molecules --config property_predictor`, got domain={raw.get('domain')!r}, "
                             f"model.kind={(raw.get('model') or {}).get('kind')!r})")
        return predictor_from_run(read_run(ckpt, self), device)

    def predictor(self, data: MolData) -> Any:
        """The property predictor named by ``data.predictor`` (loaded once per path)."""
        if data.predictor is None:
            raise ValueError("molecules: no property predictor; set data.predictor=RUN_OR_CHECKPOINT (train one with "
                             "`multidiff train molecules --config property_predictor`)")
        key = str(Path(data.predictor).expanduser())
        if key not in self._predictors:
            self._predictors[key] = self.load_predictor(key)
        return self._predictors[key]

    def guidance_log_prob(self, cfg: MolConfig, request: SampleRequest) -> Any:
        """Laplace log-likelihood (unit: the predictor's MAD) of the request's target properties under the predictor."""
        from domains.molecules.properties import guidance_log_prob

        predictor = self.predictor(cfg.data)
        props = request.meta.get("properties") or {}
        names = [n for n in props if n in predictor.names]
        if not names:
            raise ValueError(f"molecules: --gradient-scale needs a target for a property the predictor {predictor.path} "
                             f"predicts ({predictor.names}): give --condition {predictor.names[0]}=VALUE")
        targets = torch.tensor([props[n] for n in names], dtype=torch.float32).T
        if cfg.data.atom_types != "categorical":
            return guidance_log_prob(predictor, targets, names, request.kwargs["batch"], request.space.num_samples,
                                     cfg.data.include_charges)
        # a categorical model's x0 estimate holds class probabilities: the predictor gets EDM's rows of their
        # expectation, [pos | probs * 0.25 (| E[Z] * 0.1)], a differentiable map of the estimate
        fn = guidance_log_prob(predictor, targets, names, request.kwargs["batch"], request.space.num_samples,
                               predictor.include_charges)
        z = torch.tensor([ATOMIC_NUMBERS[e] for e in ELEMENTS], dtype=torch.float32)

        def log_prob(x0: Tensor, t: Tensor) -> Tensor:
            probs = x0[:, 3 : 3 + len(ELEMENTS)]
            cols = [x0[:, :3], probs * ONE_HOT_SCALE]
            if predictor.include_charges:
                cols.append((probs @ z.to(probs)).unsqueeze(-1) * CHARGE_SCALE)
            return fn(torch.cat(cols, -1), t)

        return log_prob

    def property_baselines(self, data: MolData) -> dict[str, dict[str, float]]:
        """EDM's reference rows for the predictor (QM9 lower bound, shuffled labels, n atoms only), cached per run."""
        from domains.molecules.data import _resolve_indices
        from domains.molecules.properties import property_baselines

        predictor = self.predictor(data)
        key = (str(predictor.path), predictor.step)
        if key not in self._baselines:
            qm9 = self.qm9(data)
            self._baselines[key] = property_baselines(predictor, qm9, _resolve_indices(len(qm9), "generator"))
        return self._baselines[key]

    def decode(self, x: Tensor, request: SampleRequest) -> MolSamples:
        x = x.detach().cpu().to(torch.float32)
        pos = x[:, :3]
        centroid = request.meta.get("fragment_centroid")
        if centroid is not None:
            pos = pos + centroid  # fragment frame -> the fragment's input coordinates
        elements = x[:, 3 : 3 + len(ELEMENTS)].argmax(-1)
        from domains.molecules.metrics import Molecule

        mols = []
        start = 0
        for n in request.meta["sizes"].tolist():
            mols.append(Molecule(pos[start : start + n].numpy().astype(np.float64),
                                 tuple(ELEMENTS[i] for i in elements[start : start + n].tolist())))
            start += n
        return MolSamples(mols, request.meta.get("properties") or {})

    def merge(self, parts: list[MolSamples]) -> MolSamples:
        names = list(parts[0].properties)
        return MolSamples([m for p in parts for m in p.molecules],
                          {n: [v for p in parts for v in p.properties[n]] for n in names})

    def write(self, samples: MolSamples, out_dir: Path, *, figures: bool = True) -> list[Path]:
        from domains.molecules.io import write_png_grid, write_sdf, write_xyz

        out_dir.mkdir(parents=True, exist_ok=True)
        comments = []
        for k in range(len(samples.molecules)):
            props = " ".join(f"{name}={vals[k]:.6g}" for name, vals in samples.properties.items())
            comments.append(f"molecule {k}" + (f" {props}" if props else ""))
        files = [write_sdf(samples.molecules, out_dir / SAMPLES_FILE),
                 write_xyz(samples.molecules, out_dir / SAMPLES_XYZ, comments)]
        if figures:
            files.append(write_png_grid(samples.molecules[:PNG_LIMIT], out_dir / "molecules.png"))
        return files

    # --- evaluation -----------------------------------------------------------------------------------------------
    def read(self, path: Path) -> list[Any]:
        """Molecules of an SDF/XYZ file, or of the ``molecules.xyz`` written by ``write`` into a directory."""
        from domains.molecules.io import read_sdf, read_xyz

        path = Path(path)
        if path.is_dir():
            target = path / SAMPLES_XYZ
            if not target.is_file():
                raise FileNotFoundError(f"{path}: no {SAMPLES_XYZ} (expected samples written by `multidiff sample molecules`)")
            return read_xyz(target, check_geometry=False)  # our own samples: a collapsed one is scored, not refused
        suffix = path.suffix.lower()
        if suffix == ".xyz":
            return read_xyz(path)
        if suffix in (".sdf", ".mol"):
            return read_sdf(path)
        raise ValueError(f"{path}: unknown molecule format {suffix or '(no suffix)'}; expected .sdf, .xyz or a samples directory")

    def evaluate(self, path: Path, cfg: MolConfig | None = None) -> dict[str, float]:
        from domains.molecules.metrics import evaluate_molecules

        mols = self.read(path)
        data = cfg.data if cfg is not None else MolData()
        reference = None
        if data.novelty or self._smiles_cache(data).is_file():
            reference = self.reference_smiles(data)
        metrics: dict[str, float] = dict(evaluate_molecules(mols, reference))
        if data.predictor is not None:
            from domains.molecules.properties import property_metrics

            targets = _samples_targets(Path(path))
            metrics.update(property_metrics(self.predictor(data), mols, targets, self.property_baselines(data)))
        return metrics


def _samples_targets(path: Path) -> dict[str, list[float]]:
    """Target properties written by ``write`` into the XYZ comment lines (``molecule k alpha=80 ...``); {} if none."""
    from domains.molecules.io import read_xyz_records

    target = path / SAMPLES_XYZ if path.is_dir() else path
    if target.suffix.lower() != ".xyz":
        return {}
    rows: list[dict[str, float]] = []
    for record in read_xyz_records(target, check_geometry=False):
        row = {}
        for token in record.comment.split():
            key, sep, value = token.partition("=")
            if sep and key in PROPERTY_NAMES:
                try:
                    row[key] = float(value)
                except ValueError:
                    raise ValueError(f"{target}, line {record.line + 1}: {key}={value!r} is not a number") from None
        rows.append(row)
    names = [k for k in PROPERTY_NAMES if rows and all(k in r for r in rows)]
    return {k: [r[k] for r in rows] for k in names}
