"""Change data capture of file data sets: incremental = full rebuild, changes reported, data version in the run log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from domains.audio import data as adata

SR = 8000


def tone(path: Path, freq: float, seconds: float = 0.3, amp: float = 0.3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    sf.write(str(path), (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, subtype="PCM_16")
    return path


def make_folder(root: Path) -> Path:
    for k, label in enumerate(("a", "b", "c")):
        for i in range(4):
            tone(root / label / f"clip{i}.wav", 200 + 40 * k + 10 * i)
    sf.write(str(root / "c" / "silent.wav"), np.zeros(800, dtype=np.float32), SR)  # skipped, and stays skipped
    return root


def load(root: Path) -> adata.AudioClips:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adata.AudioDataWarning)
        return adata.load_folder(root, sample_rate=SR, seconds=0.32, cache=True)


def change(root: Path, new_label: bool = True) -> None:
    """Two added (one in a new label folder), two changed (one of the same size), two removed, one only touched."""
    tone(root / "a" / "new.wav", 330)
    tone(root / ("d" if new_label else "c") / "clip0.wav" if new_label else root / "c" / "more.wav", 500)
    tone(root / "b" / "clip1.wav", 999)  # same length: same size, other content
    tone(root / "c" / "clip2.wav", 250, seconds=0.2)
    (root / "a" / "clip3.wav").unlink()
    (root / "b" / "clip0.wav").unlink()
    st = (root / "c" / "clip0.wav").stat()
    os.utime(root / "c" / "clip0.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # new mtime, same bytes


def test_incremental_prepare_equals_a_full_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder(tmp_path / "clips")
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "cache"))
    first = adata.load_folder(root, sample_rate=SR, seconds=0.32, sync_only=True)
    assert (first.changes["added"], first.changes["removed"]) == (13, 0)
    with pytest.warns(adata.AudioDataWarning, match="silent"):  # a skipped file is still named on every load
        before = adata.load_folder(root, sample_rate=SR, seconds=0.32, cache=True)
    again = adata.load_folder(root, sample_rate=SR, seconds=0.32, sync_only=True)
    assert again.changes["unchanged"] == 13 and again.hashed == 0 and again.version == before.version
    change(root)
    synced = adata.load_folder(root, sample_rate=SR, seconds=0.32, sync_only=True)
    c = synced.changes
    assert (c["added"], c["changed"], c["removed"], c["unchanged"]) == (2, 2, 2, 9), c
    assert sorted(synced.added) == ["a/new.wav", "d/clip0.wav"]
    assert sorted(synced.changed) == ["b/clip1.wav", "c/clip2.wav"]
    assert sorted(synced.removed) == ["a/clip3.wav", "b/clip0.wav"]
    assert synced.hashed == 5  # only files whose size or mtime moved were read (4 new/changed + the touched one)
    incremental = load(root)
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "fresh"))
    full = load(root)
    assert incremental.version == full.version != before.version
    assert incremental.sources == full.sources and incremental.groups == full.groups
    assert incremental.class_names == full.class_names == ["a", "b", "c", "d"]
    assert np.array_equal(incremental.labels.numpy(), full.labels.numpy())
    assert np.array_equal(incremental.audio.numpy(), full.audio.numpy())  # bit for bit
    uncached = adata.load_folder(root, sample_rate=SR, seconds=0.32)  # the loader without a cache agrees
    assert np.abs(uncached.audio.numpy() - full.audio.numpy()).max() < 1e-6


def test_fsdd_source_and_multidiff_data_report_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multidiff import pipeline
    from multidiff.registry import get_domain

    rec = tmp_path / "fsdd" / "recordings"
    for d in range(3):
        for take in (0, 7):
            tone(rec / f"{d}_spk_{take}.wav", 300 + 50 * d + take)
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "cache"))
    dom = get_domain("audio")
    cfg = pipeline.load_run_config(dom, "fsdd", [f"data.root={rec.parent}", f"data.sample_rate={SR}", "data.seconds=0.32"])
    s1 = dom.prepare_data(cfg)
    assert s1["changes"]["added"] == 6 and s1["train"]["clips"] == 3 and s1["test"]["clips"] == 3
    (rec / "2_spk_7.wav").unlink()
    tone(rec / "1_spk_9.wav", 123)
    s2 = dom.prepare_data(cfg)
    assert (s2["changes"]["added"], s2["changes"]["removed"], s2["changes"]["unchanged"]) == (1, 1, 5)
    assert s2["changes"]["added_files"] == ["1_spk_9.wav"] and s2["train"]["per_class"]["one"] == 2
    s3 = dom.prepare_data(cfg)  # unchanged: the counts stored for this data version, nothing decoded or recounted
    assert s3["changes"]["unchanged"] == 6 and {k: s3[k] for k in ("train", "test")} == {k: s2[k] for k in ("train", "test")}
    train = dom.build_dataset(cfg, "train")
    assert train.data_version == s2["changes"]["data_version"] != s1["changes"]["data_version"]


def tiny_folder_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str], Path, Path]:
    """A tiny audio model trained 2 steps on a three-label folder: (domain, overrides, folder, run directory)."""
    from multidiff import pipeline
    from multidiff.registry import get_domain

    root = make_folder(tmp_path / "clips")
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "cache"))
    dom = get_domain("audio")
    base = [f"data.root={root}", "data.source=folder", f"data.sample_rate={SR}", "data.seconds=0.32", "data.max_shift=0",
            "model.channels=8", "model.multipliers=[1,2]", "model.factors=[1,2]", "model.blocks=[1,1]", "model.patch=8",
            "model.full_rate_channels=0", "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1"]
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adata.AudioDataWarning)
        pipeline.train(dom, pipeline.load_run_config(dom, "waveform", [*base, "train.steps=2"]), run, device="cpu",
                       progress=False)
    return dom, base, root, run


def test_resume_on_a_changed_data_set_records_the_new_data_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multidiff import pipeline

    dom, base, root, run = tiny_folder_run(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adata.AudioDataWarning)
        change(root, new_label=False)  # the label set is fixed by the weights; its clips may change
        res = pipeline.train(dom, pipeline.load_run_config(dom, "waveform", [*base, "train.steps=4"]), run, resume=True,
                             device="cpu", progress=False)
    assert res.step == 4
    events = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "event" in r]
    start, resume = events[0], events[-1]
    assert (start["event"], resume["event"]) == ("start", "resume") and resume["step"] == 2
    assert start["data_version"] != resume["data_version"] == load(root).version


def test_resume_on_a_data_set_with_a_new_label_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from multidiff import pipeline

    dom, base, root, run = tiny_folder_run(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adata.AudioDataWarning)
        before = sorted(p.name for p in (run / "checkpoints").iterdir())
        change(root, new_label=True)  # label "d" appears: the class embedding (labels + CFG's null row) grows 4 -> 5
        with pytest.raises(ValueError, match=r"cannot resume .*label_emb.*\[4, .*now \[5, .*data\.class_names.*new run"):
            pipeline.train(dom, pipeline.load_run_config(dom, "waveform", [*base, "train.steps=4"]), run, resume=True,
                           device="cpu", progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing written over


def test_watch_keeps_the_cache_in_sync_and_stops_by_itself(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "clips")
    env = {**os.environ, "MULTIDIFF_CACHE": str(tmp_path / "cache"), "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "multidiff.cli", "data", "audio", "data.source=folder", f"data.root={root}",
         f"data.sample_rate={SR}", "data.seconds=0.32", "--watch", "--interval", "0.2", "--watch-seconds", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert first["changes"]["added"] == 13
    tone(root / "b" / "late.wav", 440)
    t0 = time.monotonic()
    second = json.loads(proc.stdout.readline())
    assert second["changes"]["added_files"] == ["b/late.wav"] and time.monotonic() - t0 < 5
    assert proc.wait(timeout=30) == 0


def test_a_folder_recreated_with_the_same_bytes_loads_from_its_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file touched (new mtime, same content): nothing is reprocessed, the index learns the new stats, and the
    clips still come from the existing data file (this once failed with 'no cached tensor')."""
    root = make_folder(tmp_path / "clips")
    monkeypatch.setenv("MULTIDIFF_CACHE", str(tmp_path / "cache"))
    before = load(root)
    for path in root.rglob("*.wav"):
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = load(root)  # the sync that sees the new stats and the read of the clips in one call
    assert after.version == before.version and np.array_equal(after.audio.numpy(), before.audio.numpy())
    again = adata.load_folder(root, sample_rate=SR, seconds=0.32, sync_only=True)
    assert again.changes["unchanged"] == 13 and again.hashed == 0  # the new stats were remembered
