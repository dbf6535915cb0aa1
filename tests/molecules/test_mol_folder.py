"""data.source=folder for molecules: SDF / XYZ files with change data capture (incremental = full rebuild)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from domains.molecules.data import MoleculeDataWarning, folder_split, load_molecule_folder, sync_molecule_folder
from domains.molecules.io import write_sdf, write_xyz


def methane(shift: float = 0.0) -> tuple[np.ndarray, list[str]]:
    pos = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    return pos + shift, ["C", "H", "H", "H", "H"]


def water(scale: float = 1.0) -> tuple[np.ndarray, list[str]]:
    return np.array([[0, 0, 0], [0.96 * scale, 0, 0], [-0.24, 0.93, 0]]), ["O", "H", "H"]


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    for k in range(6):
        write_xyz([methane(0.1 * k), water(1 + 0.01 * k)], root / f"set{k}.xyz")
    (root / "sub").mkdir()
    write_sdf([methane(), water()], root / "sub" / "pair.sdf")
    (root / "bad.xyz").write_text("2\nx\nC 0 0 0\n")  # one atom line short: skipped, named
    return root


def change(root: Path) -> None:
    write_xyz([water(1.05)], root / "set0.xyz")  # changed
    (root / "set1.xyz").unlink()  # removed
    write_xyz([methane(2.0)] * 3, root / "sub" / "new.xyz")  # added


def test_folder_prepare_is_incremental_and_equals_a_full_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "mols")
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "cache"))
    first = sync_molecule_folder(root)
    assert first.changes["added"] == 8
    with pytest.warns(MoleculeDataWarning, match="bad.xyz"):
        before = load_molecule_folder(root)
    assert len(before) == 14 and before.keys[0] == "set0.xyz#1"
    change(root)
    c = sync_molecule_folder(root).changes
    assert (c["added"], c["changed"], c["removed"], c["unchanged"]) == (1, 1, 1, 6), c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoleculeDataWarning)
        inc = load_molecule_folder(root)
        monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "fresh"))
        full = load_molecule_folder(root)
    assert inc.version == full.version != before.version and inc.keys == full.keys
    for name in ("pos", "z", "ptr"):
        assert torch.equal(getattr(inc, name), getattr(full, name)), name
    assert len(inc) == 14 - 2 - 2 + 1 + 3
    # splits hash each molecule's key: molecules that stayed keep their split
    keys = list(inc.keys)
    parts = [set(folder_split(keys, s).tolist()) for s in ("train", "valid", "test")]
    assert sum(map(len, parts)) == len(keys) and not (parts[0] & parts[1] or parts[0] & parts[2])


def test_train_on_a_folder_then_resume_on_its_new_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multidiff import pipeline
    from multidiff.registry import get_domain

    root = make_folder(tmp_path / "mols")
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "cache"))
    dom = get_domain("molecules")
    over = ["data.source=folder", f"data.root={root}", "data.split=all", "model.hidden=8", "model.layers=1",
            "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0"]
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoleculeDataWarning)
        summary = dom.prepare_data(pipeline.load_run_config(dom, "fast", over))
        assert summary["molecules"] == 14 and summary["changes"]["added"] == 8
        pipeline.train(dom, pipeline.load_run_config(dom, "fast", [*over, "train.steps=2"]), run, device="cpu",
                       progress=False)
        change(root)
        res = pipeline.train(get_domain("molecules"), pipeline.load_run_config(dom, "fast", [*over, "train.steps=4"]),
                             run, resume=True, device="cpu", progress=False)
        new_version = load_molecule_folder(root).version
    assert res.step == 4
    events = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "event" in r]
    assert events[0]["data_version"] != events[-1]["data_version"] == new_version
    with pytest.raises(ValueError, match="no properties"):
        dom.build_dataset(pipeline.load_run_config(dom, "fast", [*over, "data.conditioning=[alpha]"]))
