"""QM9 loader, cache, EDM splits, PyG dataset and p(property | n) sampler."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from domains.molecules import data as qm9_data
from domains.molecules.constants import HARTREE_TO_MEV, PROPERTY_NAMES
from domains.molecules.data import (
    QM9,
    PropertyGivenN,
    QM9Dataset,
    atom_count_histogram,
    conditional_halves,
    edm_split,
    load_qm9,
)
from domains.molecules.egnn import fully_connected_edges

# EDM's published `n_nodes` histogram of the QM9 (with H) training split (Hoogeboom et al. 2022, configs/datasets_config.py).
EDM_TRAIN_N_NODES = {
    22: 3393, 17: 13025, 23: 4848, 21: 9970, 19: 13832, 20: 9482, 16: 10644, 13: 3060, 15: 7796, 25: 1506,
    18: 13364, 12: 1689, 11: 807, 24: 539, 14: 5136, 26: 48, 7: 16, 10: 362, 8: 49, 9: 124, 27: 266, 4: 4,
    29: 25, 6: 9, 5: 5, 3: 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def qm9() -> QM9:
    """Full QM9 from the default cache (converted once per machine)."""
    return load_qm9(progress=False)


def test_loaded_layout(qm9: QM9) -> None:
    assert len(qm9) == 130831
    assert qm9.pos.dtype == torch.float32 and qm9.pos.shape == (len(qm9.z), 3)
    assert qm9.z.dtype == torch.int64 and qm9.ptr.dtype == torch.int64
    assert int(qm9.ptr[0]) == 0 and int(qm9.ptr[-1]) == len(qm9.z)
    assert set(qm9.z.unique().tolist()) == {1, 6, 7, 8, 9}
    assert int(qm9.num_atoms.min()) == 3 and int(qm9.num_atoms.max()) == 29
    assert qm9.properties.shape == (len(qm9), 6) and qm9.property_names == list(PROPERTY_NAMES)
    assert len(qm9.smiles) == len(qm9)
    # Original ids: strictly increasing, 1..133885 with the 3,054 excluded molecules missing.
    assert bool((qm9.index[1:] > qm9.index[:-1]).all())
    assert int(qm9.index[0]) == 1 and int(qm9.index[-1]) == 133885


def test_methane_is_qm9_id_1(qm9: QM9) -> None:
    pos, z = qm9.molecule(0)
    assert int(qm9.index[0]) == 1 and qm9.smiles[0] == "C"
    assert z.tolist() == [6, 1, 1, 1, 1]
    ch = (pos[1:] - pos[0]).norm(dim=-1)
    assert torch.allclose(ch, torch.full((4,), 1.0919), atol=2e-3)  # B3LYP C-H bond, Angstrom
    p = dict(zip(qm9.property_names, qm9.properties[0].tolist()))
    assert p["alpha"] == pytest.approx(13.21, abs=1e-4)  # Bohr^3
    assert p["homo"] == pytest.approx(-0.3877 * HARTREE_TO_MEV, abs=0.01)  # meV: about -10.55 eV
    assert p["lumo"] == pytest.approx(0.1171 * HARTREE_TO_MEV, abs=0.01)
    assert p["gap"] == pytest.approx(0.5048 * HARTREE_TO_MEV, abs=0.01)
    assert p["mu"] == pytest.approx(0.0, abs=1e-6)  # tetrahedral symmetry
    assert p["Cv"] == pytest.approx(6.469, abs=1e-4)


def test_property_units_consistent(qm9: QM9) -> None:
    gap, homo, lumo = qm9.property("gap"), qm9.property("homo"), qm9.property("lumo")
    # The CSV rounds to 1e-4 Hartree = 2.7 meV; float32 at 1e4 meV adds ~1e-3.
    assert float((gap - (lumo - homo)).abs().max()) < 1e-4 * HARTREE_TO_MEV + 0.05
    assert float(homo.min()) > -12_000 and float(homo.max()) < -2_500  # meV, i.e. -12 .. -2.5 eV
    assert float(gap.min()) > 0 and float(gap.max()) < 17_500
    assert float(qm9.property("mu").min()) >= 0 and float(qm9.property("mu").max()) < 30
    assert 5 < float(qm9.property("Cv").min()) and float(qm9.property("Cv").max()) < 50
    assert 5 < float(qm9.property("alpha").min()) and float(qm9.property("alpha").max()) < 200


def test_edm_split_sizes_and_disjoint() -> None:
    s = edm_split()
    assert {k: len(v) for k, v in s.items()} == {"train": 100000, "valid": 17748, "test": 13083}
    allidx = np.concatenate([s["train"], s["valid"], s["test"]])
    assert np.array_equal(np.sort(allidx), np.arange(130831))


def test_edm_split_equals_global_seed_recipe() -> None:
    state = np.random.get_state()
    try:
        np.random.seed(0)
        perm = np.random.permutation(130831)
    finally:
        np.random.set_state(state)
    s = edm_split()
    assert np.array_equal(s["train"], perm[:100000])
    assert np.array_equal(s["valid"], perm[100000:117748])
    assert np.array_equal(s["test"], perm[117748:])


def test_train_histogram_matches_edm(qm9: QM9) -> None:
    assert atom_count_histogram(qm9, edm_split()["train"]) == EDM_TRAIN_N_NODES
    assert atom_count_histogram(QM9Dataset(qm9, "train")) == EDM_TRAIN_N_NODES


def test_conditional_halves() -> None:
    predictor, generator = conditional_halves()
    assert len(predictor) == len(generator) == 50000
    assert np.array_equal(np.sort(np.concatenate([predictor, generator])), np.arange(100000))
    assert np.array_equal(np.concatenate([predictor, generator]), np.random.RandomState(42).permutation(100000))


def test_dataset_splits_resolve(qm9: QM9) -> None:
    train = edm_split()["train"]
    predictor, generator = conditional_halves()
    assert np.array_equal(QM9Dataset(qm9, "predictor").indices, train[predictor])
    assert np.array_equal(QM9Dataset(qm9, "train_b").indices, train[generator])
    assert len(QM9Dataset(qm9, "valid")) == 17748 and len(QM9Dataset(qm9)) == 130831
    with pytest.raises(ValueError, match="unknown split"):
        QM9Dataset(qm9, "nope")


def test_dataset_item(qm9: QM9) -> None:
    ds = QM9Dataset(qm9, "test")
    row = int(ds.indices[3])
    d = ds[3]
    pos, z = qm9.molecule(row)
    n = len(z)
    assert d.num_nodes == n and torch.equal(d.pos, pos) and torch.equal(d.z, z)
    assert d.one_hot.shape == (n, 5) and torch.equal(d.one_hot.sum(1), torch.ones(n))
    symbols_to_col = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}
    assert d.one_hot.argmax(1).tolist() == [symbols_to_col[int(a)] for a in z]
    assert torch.equal(d.charges.squeeze(-1), z.float())  # unscaled: EDM's 0.1 factor is applied by the model
    assert d.y.shape == (1, 6) and torch.equal(d.y[0], qm9.properties[row])
    assert "edge_index" not in d  # edges only on request


def test_fully_connected_edges_on_batch(qm9: QM9) -> None:
    ds = QM9Dataset(qm9, "train", fully_connected=True)
    items = [ds[i] for i in range(5)]
    for d in items:
        assert d.edge_index.shape[1] == d.num_nodes * (d.num_nodes - 1)
    batch = Batch.from_data_list(items)
    ei = fully_connected_edges(batch.batch)
    counts = [d.num_nodes for d in items]
    assert ei.shape[1] == sum(n * (n - 1) for n in counts)
    assert bool((batch.batch[ei[0]] == batch.batch[ei[1]]).all())  # no edges across molecules
    assert bool((ei[0] != ei[1]).all())
    key = ei[0] * 10_000 + ei[1]
    per_item_key = batch.edge_index[0] * 10_000 + batch.edge_index[1]  # per-molecule edges, offset by Batch
    assert torch.equal(torch.sort(key).values, torch.sort(per_item_key).values)
    # Radius cutoff keeps exactly the pairs within r.
    r = 1.6
    er = fully_connected_edges(batch.batch, pos=batch.pos, radius=r)
    dist = (batch.pos[ei[0]] - batch.pos[ei[1]]).norm(dim=-1)
    assert er.shape[1] == int((dist <= r).sum()) and 0 < er.shape[1] < ei.shape[1]
    assert float((batch.pos[er[0]] - batch.pos[er[1]]).norm(dim=-1).max()) <= r


def test_property_given_n(qm9: QM9) -> None:
    sampler = PropertyGivenN.from_qm9(qm9, "generator", names=["gap", "alpha"])
    idx = QM9Dataset(qm9, "generator").indices
    n = qm9.num_atoms.numpy()[idx]
    g = torch.Generator().manual_seed(0)
    draws = sampler.sample(torch.tensor([9, 9, 9, 19, 19, 4]), generator=g)
    assert draws.shape == (6, 2)
    cols = [qm9.property_names.index("gap"), qm9.property_names.index("alpha")]
    for k, nn in enumerate([9, 9, 9, 19, 19, 4]):
        rows = qm9.properties[idx[n == nn]][:, cols]
        assert bool((rows == draws[k]).all(1).any()), f"draw {k} is not a training molecule with {nn} atoms"
    many = sampler.sample(torch.full((4000,), 19), generator=g)
    assert len(torch.unique(many[:, 0])) > 1000  # spreads over the empirical set, not one value
    with pytest.raises(ValueError, match="n_atoms"):
        sampler.sample([2])


# ---- cache behaviour on a tiny fake source ------------------------------------------------------


def _fake_source(path: Path, rows: int) -> Path:
    """First `rows` molecules of the real CSV (header included) as a small source file."""
    with (files("qm9pack") / "data" / "qm9_part1.csv").open() as f:
        lines = [next(f) for _ in range(rows + 1)]
    path.write_text("".join(lines))
    return path


def test_cache_reused_then_rebuilt_on_hash_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _fake_source(tmp_path / "src.csv", 3)
    cache = tmp_path / "cache"
    first = load_qm9(cache, progress=True, sources=[src])
    assert len(first) == 3 and first.smiles == ["C", "N", "O"]
    target = cache / qm9_data.CACHE_FILE
    st = target.stat()
    assert sorted(p.name for p in cache.iterdir()) == [qm9_data.CACHE_FILE]  # no temp files left behind

    def _no_convert(*a: object, **k: object) -> None:
        raise AssertionError("reconverted although the source hash did not change")

    with monkeypatch.context() as m:
        m.setattr(qm9_data, "_convert", _no_convert)
        again = load_qm9(cache, progress=False, sources=[src])
    assert torch.equal(again.pos, first.pos)
    st2 = target.stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    _fake_source(src, 5)  # changed bytes -> changed hash -> reconversion
    grown = load_qm9(cache, progress=False, sources=[src])
    assert len(grown) == 5
    assert target.stat().st_ino != st.st_ino or target.stat().st_mtime_ns != st.st_mtime_ns


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src.csv", 2)
    load_qm9(tmp_path, progress=False, sources=[src])
    (tmp_path / qm9_data.CACHE_FILE).write_bytes(b"garbage")
    assert len(load_qm9(tmp_path, progress=False, sources=[src])) == 2


def test_default_cache_not_reconverted(qm9: QM9, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qm9_data, "_convert", lambda *a, **k: pytest.fail("reconverted the real QM9 cache"))
    assert len(load_qm9(progress=False)) == len(qm9)


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "c"))
    assert qm9_data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MULTIDIFF_CACHE")
    assert qm9_data.default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "multidiff"


def test_converter_rejects_unknown_element(tmp_path: Path) -> None:
    src = _fake_source(tmp_path / "src.csv", 2)
    src.write_text(src.read_text().replace("['N','H','H','H']", "['Cl','H','H','H']"))
    with pytest.raises(ValueError, match=r"src\.csv, line 3: element Cl not in vocabulary H,C,N,O,F"):
        load_qm9(tmp_path / "c", progress=False, sources=[src])
