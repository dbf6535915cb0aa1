"""Tests for the audio dataset adapters (domains/audio/data.py) and the espeak digits cache (domains/audio/synth.py)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from domains.audio import data, synth
from domains.audio.data import (
    AudioClips,
    AudioDataError,
    AudioDataWarning,
    ClipDataset,
    DigitCacheError,
    load_digits,
    load_folder,
    load_fsdd,
    load_speechcommands,
)

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    """A sine tone, float32."""
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, x: np.ndarray, sr: int, **kw: object) -> Path:
    """Write audio with soundfile, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, **kw)
    return path


def messages(record: list[warnings.WarningMessage]) -> list[str]:
    """Text of the AudioDataWarnings in a recorder."""
    return [str(w.message) for w in record if issubclass(w.category, AudioDataWarning)]


# ---------------------------------------------------------------- containers


def make_clips(n: int = 6, length: int = 100) -> AudioClips:
    """A small synthetic AudioClips."""
    audio = torch.arange(n * length, dtype=torch.float32).reshape(n, 1, length) / (n * length)
    return AudioClips(audio=audio, labels=torch.arange(n) % 3, groups=[f"g{i % 2}" for i in range(n)],
                      sample_rate=100, class_names=["a", "b", "c"], sources=[f"s{i}" for i in range(n)])


def test_subset_accepts_indices_masks_and_slices() -> None:
    clips = make_clips()
    for idx in ([4, 1], torch.tensor([4, 1]), np.array([4, 1])):
        sub = clips.subset(idx)
        assert sub.sources == ["s4", "s1"] and sub.groups == ["g0", "g1"]
        assert torch.equal(sub.audio, clips.audio[[4, 1]]) and sub.labels.tolist() == [1, 1]
    mask = clips.labels == 0
    assert clips.subset(mask).sources == ["s0", "s3"]
    assert clips.subset(slice(1, 3)).sources == ["s1", "s2"]
    assert len(clips.subset([])) == 0 and clips.subset([0]).class_names == ["a", "b", "c"]
    with pytest.raises(ValueError):
        AudioClips(audio=clips.audio[:, 0], labels=clips.labels, groups=clips.groups, sample_rate=100,
                   class_names=clips.class_names, sources=clips.sources)


def test_clip_dataset_items_and_shift() -> None:
    clips = make_clips()
    plain = ClipDataset(clips)
    x, y = plain[2]
    assert len(plain) == 6 and x.shape == (1, 100) and torch.equal(x, clips.audio[2]) and int(y) == 2
    batch = next(iter(torch.utils.data.DataLoader(plain, batch_size=4)))
    assert batch[0].shape == (4, 1, 100) and batch[1].dtype == torch.int64
    shifted = ClipDataset(clips, max_shift=10)
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x, _ = shifted[3]
        ref = clips.audio[3, 0]
        s = next(k for k in range(-10, 11) if torch.equal(x[0], _shift(ref, k)))
        seen.add(s)
    assert len(seen) > 5 and seen <= set(range(-10, 11))


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-filled shift of a 1-D tensor by k samples (positive = later)."""
    out = torch.zeros_like(x)
    if k >= 0:
        out[k:] = x[:len(x) - k]
    else:
        out[:k] = x[-k:]
    return out


# ---------------------------------------------------------------- FSDD


@pytest.fixture(scope="module")
def fsdd(fsdd_dir: Path) -> dict[str, AudioClips]:
    """FSDD train and test splits, loaded once."""
    return {split: load_fsdd(fsdd_dir, split) for split in ("train", "test")}


def test_fsdd_sizes_shapes_groups(fsdd: dict[str, AudioClips], fsdd_dir: Path) -> None:
    speakers = set(json.loads((fsdd_dir / "speakers.json").read_text()))
    assert len(speakers) == 6
    for split, n in (("train", 2700), ("test", 300)):
        clips = fsdd[split]
        assert len(clips) == n and clips.audio.shape == (n, 1, 16000) and clips.audio.dtype == torch.float32
        assert clips.labels.dtype == torch.int64 and clips.sample_rate == 16000 and clips.class_names == DIGITS
        assert set(clips.groups) == speakers
        assert float(clips.audio.abs().max()) <= 1.0
        assert Counter(clips.labels.tolist()) == {d: n // 10 for d in range(10)}


def test_fsdd_labels_groups_and_split_follow_file_names(fsdd: dict[str, AudioClips]) -> None:
    for split, clips in fsdd.items():
        for label, group, src in zip(clips.labels.tolist(), clips.groups, clips.sources):
            digit, speaker, take = re.fullmatch(r"(\d)_(\w+)_(\d+)\.wav", Path(src).name).groups()
            assert label == int(digit) and group == speaker
            assert (int(take) < 5) == (split == "test")
    assert not set(fsdd["train"].sources) & set(fsdd["test"].sources)


def test_fsdd_is_resampled_not_repeated(fsdd: dict[str, AudioClips]) -> None:
    # An 8 kHz source has nothing above 4 kHz: proper resampling keeps it so, sample-repeating would not (~4%).
    spec = torch.fft.rfft(fsdd["test"].audio[:, 0], dim=-1).abs() ** 2
    freqs = torch.fft.rfftfreq(16000, 1 / 16000)
    assert float(spec[:, freqs > 4000].sum() / spec.sum()) < 1e-3
    # Centred, un-normalised, right duration: every other output sample is the 8 kHz source sample.
    clips = fsdd["test"]
    checked = 0
    for i in range(0, len(clips), 37):
        x, sr = sf.read(clips.sources[i], dtype="float32")
        assert sr == 8000
        n = len(x)
        out = clips.audio[i, 0].numpy()
        if 2 * n <= 16000:
            left = (16000 - 2 * n) // 2
            assert not out[:left].any() and not out[left + 2 * n + 8:].any()
            even = out[left:left + 2 * n:2]
        else:  # centre crop of the 2n resampled samples
            start = (2 * n - 16000) // 2
            even, x = out[start % 2::2], x[(start + 1) // 2:][:8000]
        corr = np.corrcoef(even[:len(x)], x[:len(even)])[0, 1]
        assert corr > 0.98, (clips.sources[i], corr)
        assert 0.9 < np.abs(even).max() / np.abs(x).max() < 1.1
        checked += 1
    assert checked >= 8


def test_fsdd_native_rate_is_exact_and_centre_padded(fsdd_dir: Path) -> None:
    clips = load_fsdd(fsdd_dir, "test", sample_rate=8000, seconds=0.5)
    assert clips.audio.shape == (300, 1, 4000) and clips.sample_rate == 8000
    long_seen = short_seen = 0
    for i in range(len(clips)):
        x, _ = sf.read(clips.sources[i], dtype="float32")
        out = clips.audio[i, 0].numpy()
        if len(x) <= 4000:
            left = (4000 - len(x)) // 2
            np.testing.assert_array_equal(out[left:left + len(x)], x)
            assert not out[:left].any() and not out[left + len(x):].any()
            short_seen += 1
        else:
            start = (len(x) - 4000) // 2
            np.testing.assert_array_equal(out, x[start:start + 4000])
            long_seen += 1
    assert short_seen and long_seen


def test_fsdd_bad_files_counted(tmp_path: Path) -> None:
    rec = tmp_path / "recordings"
    write(rec / "0_alice_0.wav", tone(300, 0.3, 8000), 8000, subtype="PCM_16")
    write(rec / "1_alice_7.wav", tone(400, 0.3, 8000), 8000, subtype="PCM_16")
    write(rec / "2_bob_9.wav", tone(500, 0.3, 8000), 8000, subtype="PCM_16")
    write(rec / "alice_3.wav", tone(500, 0.3, 8000), 8000)
    (rec / "3_bob_8.wav").write_bytes(b"not a wav at all")
    with pytest.warns(AudioDataWarning) as record:
        train = load_fsdd(tmp_path, "train")
    msgs = messages(record)
    assert any("alice_3.wav" in m for m in msgs) and any("3_bob_8.wav" in m for m in msgs)
    assert "skipped 2 of 4 files: 1 misnamed, 1 unreadable" in msgs[-1]
    assert train.labels.tolist() == [1, 2] and train.groups == ["alice", "bob"]
    with pytest.warns(AudioDataWarning):
        assert load_fsdd(tmp_path, "test").labels.tolist() == [0]
    with pytest.raises(AudioDataError, match=str(tmp_path / "empty")):
        (tmp_path / "empty").mkdir()
        load_fsdd(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_fsdd(tmp_path / "nope")


# ---------------------------------------------------------------- Speech Commands


@pytest.fixture()
def sc_tree(tmp_path: Path) -> Path:
    """A tiny Speech Commands v0.02 layout: 3 digit words, 1 other word, background noise, official lists."""
    root = tmp_path / "sc"
    rng = np.random.default_rng(0)
    for w, word in enumerate(["zero", "one", "two", "yes"]):
        for spk in ("aaaa1111", "bbbb2222", "cccc3333"):
            write(root / word / f"{spk}_nohash_0.wav", tone(200 + 100 * w, 1.0, 16000), 16000, subtype="PCM_16")
    write(root / "_background_noise_" / "white.wav", rng.normal(0, 0.1, 16000).astype(np.float32), 16000)
    write(root / "two" / "dddd4444_nohash_1.wav", tone(600, 0.5, 8000), 8000, subtype="PCM_16")
    (root / "validation_list.txt").write_text("zero/bbbb2222_nohash_0.wav\nyes/bbbb2222_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("one/cccc3333_nohash_0.wav\ntwo/cccc3333_nohash_0.wav\n")
    return root


def _rel(src: str) -> str:
    """word/file part of a source path."""
    return "/".join(Path(src).parts[-2:])


def test_speechcommands_split_follows_lists(sc_tree: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioDataWarning)  # a clean tree warns about nothing
        got = {s: load_speechcommands(sc_tree, s) for s in ("train", "validation", "test")}
    assert sorted(map(_rel, got["validation"].sources)) == ["zero/bbbb2222_nohash_0.wav"]
    assert sorted(map(_rel, got["test"].sources)) == ["one/cccc3333_nohash_0.wav", "two/cccc3333_nohash_0.wav"]
    assert sorted(map(_rel, got["train"].sources)) == sorted([
        "zero/aaaa1111_nohash_0.wav", "zero/cccc3333_nohash_0.wav", "one/aaaa1111_nohash_0.wav",
        "one/bbbb2222_nohash_0.wav", "two/aaaa1111_nohash_0.wav", "two/bbbb2222_nohash_0.wav",
        "two/dddd4444_nohash_1.wav"])
    for clips in got.values():
        assert clips.class_names == DIGITS and clips.audio.shape[1:] == (1, 16000)
        for label, group, src in zip(clips.labels.tolist(), clips.groups, clips.sources):
            word, name = _rel(src).split("/")
            assert DIGITS[label] == word and group == name.split("_nohash_")[0]
            assert word != "yes" and "_background_noise_" not in src


def test_speechcommands_content_and_resampling(sc_tree: Path) -> None:
    train = load_speechcommands(sc_tree, "train")
    i = next(k for k, s in enumerate(train.sources) if s.endswith("zero/aaaa1111_nohash_0.wav"))
    x, _ = sf.read(train.sources[i], dtype="float32")
    np.testing.assert_array_equal(train.audio[i, 0].numpy(), x)  # 1 s at 16 kHz: untouched
    j = next(k for k, s in enumerate(train.sources) if s.endswith("dddd4444_nohash_1.wav"))
    out = train.audio[j, 0]
    nz = torch.nonzero(out.abs() > 1e-4).flatten()
    assert 7900 <= int(nz[-1] - nz[0]) <= 8100 and 3900 <= int(nz[0]) <= 4100  # 0.5 s at 8 kHz, centred
    spec = torch.fft.rfft(out).abs()
    assert abs(float(torch.fft.rfftfreq(16000, 1 / 16000)[spec.argmax()]) - 600) < 2
    with pytest.raises(ValueError):
        load_speechcommands(sc_tree, "valid")
    (sc_tree / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testing_list.txt"):
        load_speechcommands(sc_tree, "train")


# ---------------------------------------------------------------- folder + bad-input policy


def test_folder_labels_groups_and_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "set"
    sr = 16000
    write(root / "cat" / "a.wav", tone(300, 0.5, sr), sr)
    write(root / "cat" / "b.flac", tone(350, 0.5, 22050), 22050)
    write(root / "dog" / "spk1" / "c.wav", tone(400, 0.5, sr), sr)
    write(root / "dog" / "d.WAV", tone(450, 0.5, sr), sr)
    stereo = np.stack([tone(500, 0.5, sr), tone(500, 0.5, sr, amp=0.1)], axis=1)
    write(root / "dog" / "stereo.wav", stereo, sr)
    write(root / "cat" / "silent.wav", np.zeros(8000, np.float32), sr)
    write(root / "cat" / "zeroframes.wav", np.zeros(0, np.float32), sr)
    good = write(tmp_path / "full.wav", tone(300, 0.5, sr), sr).read_bytes()
    (root / "cat" / "truncated.wav").write_bytes(good[:20])
    (root / "dog" / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    (root / "dog" / "empty.wav").write_bytes(b"")
    write(root / "stray.wav", tone(300, 0.5, sr), sr)
    (root / "cat" / "notes.txt").write_text("not audio, not a candidate")
    with pytest.warns(AudioDataWarning) as record:
        clips = load_folder(root)
    msgs = messages(record)
    for bad in ("silent.wav", "zeroframes.wav", "truncated.wav", "corrupt.wav", "empty.wav", "stray.wav"):
        assert sum(bad in m for m in msgs) == 1, bad
    assert not any("notes.txt" in m for m in msgs)
    assert any("downmixed 1 of 11 files" in m for m in msgs)
    assert msgs[-1].endswith("skipped 6 of 11 files: 3 unreadable, 1 empty, 1 outside a label folder, 1 silent")
    assert clips.class_names == ["cat", "dog"]
    names = [Path(s).name for s in clips.sources]
    assert sorted(names) == ["a.wav", "b.flac", "c.wav", "d.WAV", "stereo.wav"]
    by_name = dict(zip(names, range(len(names))))
    assert [clips.labels[by_name[n]].item() for n in ("a.wav", "b.flac", "c.wav", "d.WAV")] == [0, 0, 1, 1]
    assert clips.groups[by_name["c.wav"]] == "spk1" and clips.groups[by_name["a.wav"]] == "unknown"
    mono = clips.audio[by_name["stereo.wav"], 0]
    stored, _ = sf.read(root / "dog" / "stereo.wav", dtype="float32")
    np.testing.assert_allclose(mono[4000:12000].numpy(), stored.mean(axis=1), atol=1e-7)
    flac = clips.audio[by_name["b.flac"], 0]  # 22.05 kHz -> 16 kHz: 0.5 s stays 0.5 s
    nz = torch.nonzero(flac.abs() > 1e-4).flatten()
    assert 7950 <= int(nz[-1] - nz[0]) <= 8050


def test_folder_empty_and_unusable_dirs_raise(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioDataError, match=re.escape(str(tmp_path / "empty")) + ".*one sub-folder per label"):
        load_folder(tmp_path / "empty")
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "a.wav").write_bytes(b"junk")
    with pytest.warns(AudioDataWarning) as record, pytest.raises(AudioDataError, match="none usable"):
        load_folder(tmp_path / "bad")
    assert any("a.wav" in m for m in messages(record)) and "skipped 1 of 1 files: 1 unreadable" in messages(record)[-1]
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "missing")


def test_folder_scales_over_range_float_files_and_skips_non_finite(tmp_path: Path) -> None:
    root = tmp_path / "set"
    sr = 16000
    loud = tone(300, 0.5, sr, amp=0.6) * 50  # a float file at x50: peak 30, most samples over full scale
    write(root / "a" / "loud.wav", loud, sr, subtype="FLOAT")
    write(root / "a" / "ok.wav", tone(300, 0.5, sr), sr, subtype="FLOAT")
    for name, value in (("nan.wav", np.nan), ("inf.wav", -np.inf)):
        x = tone(400, 0.5, sr)
        x[1600] = value
        write(root / "b" / name, x, sr, subtype="FLOAT")
    write(root / "b" / "fine.wav", tone(400, 0.5, sr), sr)
    with pytest.warns(AudioDataWarning) as record:
        clips = load_folder(root)
    msgs = messages(record)
    over, peak = float(np.mean(np.abs(loud) > 1.0)), float(np.abs(loud).max())
    said = [m for m in msgs if "loud.wav" in m]
    assert len(said) == 1 and f"{100 * over:.3g}% of the samples exceed full scale" in said[0], said
    assert f"(peak {peak:.4g}): scaled by 1/{peak:.4g} to peak 1.0" in said[0] and peak == pytest.approx(30.0)
    for name in ("nan.wav", "inf.wav"):
        assert [m for m in msgs if name in m] == [f"skipping {root / 'b' / name}: 1 of 8000 samples are NaN or "
                                                  f"infinite (the first at 0.1000 s, sample 1600)"]
    assert msgs[-1].endswith("skipped 2 of 5 files: 2 non-finite")
    names = [Path(src).name for src in clips.sources]
    assert sorted(names) == ["fine.wav", "loud.wav", "ok.wav"]
    got = clips.audio[names.index("loud.wav"), 0, 4000:12000].numpy()  # 0.5 s centred in 1 s
    np.testing.assert_allclose(got, loud / peak, atol=1e-6)  # scaled, not hard-clipped
    assert float(np.abs(got).max()) == pytest.approx(1.0, abs=1e-6) and np.mean(np.abs(got) > 0.999) < 0.05
    ok = clips.audio[names.index("ok.wav"), 0, 4000:12000].numpy()
    np.testing.assert_array_equal(ok, tone(300, 0.5, sr))  # in range: untouched


# ---------------------------------------------------------------- espeak digits


TINY = synth.DigitGrid(train_accents=("en-us",), test_accents=("en-gb-scotland",), train_variants=("m1",),
                       test_variants=("f2",), pitches=(50,), rates=(175,))


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A 2-voice x 10-digit cache built with the real synthesiser; returns (dir, seconds)."""
    pytest.importorskip("espeakng_loader")
    cache = tmp_path_factory.mktemp("digits")
    t0 = time.perf_counter()
    synth.build_digit_cache(cache, TINY, progress=False, workers=1)
    return cache, time.perf_counter() - t0


def test_digits_manifest_complete(digits_cache: tuple[Path, float]) -> None:
    cache, _ = digits_cache
    m = json.loads((cache / "manifest.json").read_text())
    assert m["generator_version"] == synth.GENERATOR_VERSION and m["espeakng_loader_version"]
    assert m["espeak_ng_version"] and m["sample_rate"] == 22050 and synth.DigitGrid.from_dict(m["grid"]) == TINY
    assert m["split"]["train_voices"] == ["en-us+m1"] and m["split"]["test_voices"] == ["en-gb-scotland+f2"]
    assert len(m["clips"]) == 20
    seen = set()
    for e in m["clips"]:
        assert set(e) >= {"digit", "voice", "variant", "accent", "pitch", "rate", "file", "sha256", "split"}
        path = cache / e["file"]
        x, sr = sf.read(path, dtype="int16")
        assert sr == 22050 and len(x) == e["num_samples"] and synth.sha256_file(path) == e["sha256"]
        assert e["voice"] == f"{e['accent']}+{e['variant']}" and e["word"] == DIGITS[e["digit"]]
        seen.add((e["split"], e["digit"]))
        pad = int(synth.TRIM_PAD_S * sr) + 1  # trimmed: loud samples start/end within the kept margin
        loud = np.flatnonzero(np.abs(x.astype(np.int32)) > synth.TRIM_REL_THRESHOLD * np.abs(x).max())
        assert loud[0] <= pad and len(x) - 1 - loud[-1] <= pad
    assert seen == {(s, d) for s in ("train", "test") for d in range(10)}


def test_digits_load_shapes_and_split(digits_cache: tuple[Path, float], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, _ = digits_cache

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the synthesiser must not run when the cache exists")

    monkeypatch.setattr(synth.EspeakEngine, "synthesize", boom)
    monkeypatch.setattr(data, "build_digit_cache", boom)
    train, test = load_digits(cache, "train"), load_digits(cache, "test")
    for clips, voice in ((train, "en-us+m1"), (test, "en-gb-scotland+f2")):
        assert clips.audio.shape == (10, 1, 16000) and clips.sample_rate == 16000 and clips.class_names == DIGITS
        assert sorted(clips.labels.tolist()) == list(range(10)) and set(clips.groups) == {voice}
        peaks = clips.audio.abs().amax(dim=(1, 2))
        assert bool((peaks > 0.05).all()) and float(peaks.max()) <= 1.0
        for i in range(10):  # centred, speech shorter than 1 s: both ends are zero padding
            assert not clips.audio[i, 0, :100].any() and not clips.audio[i, 0, -100:].any()
            assert Path(clips.sources[i]).is_file()
    assert not set(train.groups) & set(test.groups)
    small = load_digits(cache, "test", sample_rate=8000, seconds=0.5)
    assert small.audio.shape == (10, 1, 4000) and small.sample_rate == 8000
    with pytest.raises(DigitCacheError, match="fewer than num_voices=2"):
        load_digits(cache, "train", num_voices=2)


def test_digits_corrupt_or_missing_file_is_a_clear_error(digits_cache: tuple[Path, float],
                                                          tmp_path: Path) -> None:
    cache = tmp_path / "copy"
    shutil.copytree(digits_cache[0], cache)
    m = json.loads((cache / "manifest.json").read_text())
    victim = cache / m["clips"][3]["file"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the audio data: still decodes, sha256 differs
    victim.write_bytes(bytes(raw))
    with pytest.raises(DigitCacheError, match=re.escape(str(victim)) + ".*rebuild=True"):
        load_digits(cache, "train")
    victim.unlink()
    with pytest.raises(DigitCacheError, match=re.escape(str(victim)) + ".*rebuild=True"):
        load_digits(cache, "train")
    (cache / "manifest.json").write_text("{ not json")
    with pytest.raises(DigitCacheError, match="manifest.*rebuild=True"):
        load_digits(cache, "train")


def test_digits_rebuild_and_partial_grid(tmp_path: Path) -> None:
    pytest.importorskip("espeakng_loader")
    cache = tmp_path / "digits"
    cache.mkdir()
    (cache / "manifest.json").write_text("{ not json")
    clips = load_digits(cache, "test", progress=False, num_voices=1, rebuild=True)
    grid = synth.DEFAULT_GRID
    assert len(clips) == 10 * len(grid.pitches) * len(grid.rates) and len(set(clips.groups)) == 1
    accent, variant = clips.groups[0].split("+")
    assert accent in grid.test_accents and variant in grid.test_variants
    with pytest.warns(AudioDataWarning, match="partial grid"):
        train = load_digits(cache, "train", progress=False)
    accent, variant = train.groups[0].split("+")
    assert accent in grid.train_accents and variant in grid.train_variants


def test_digits_interrupted_build_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("espeakng_loader")
    real = synth._render
    calls = []

    def crash_after_first(cache_dir: Path, specs: list, volume: int) -> list:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(cache_dir, specs, volume)

    monkeypatch.setattr(synth, "_render", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        synth.build_digit_cache(tmp_path, TINY, progress=False, workers=1)
    assert any((tmp_path / "clips").rglob("*.wav")) and not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(synth, "_render", real)
    with pytest.raises(DigitCacheError, match="no digits manifest"):
        synth.read_manifest(tmp_path)


def test_digits_process_pool_matches_layout(digits_cache: tuple[Path, float], tmp_path: Path) -> None:
    m = synth.build_digit_cache(tmp_path, TINY, progress=False, workers=2)
    ref = json.loads((digits_cache[0] / "manifest.json").read_text())
    assert m["workers"] == 2
    assert [e["file"] for e in m["clips"]] == [e["file"] for e in ref["clips"]]
    assert all((tmp_path / e["file"]).is_file() for e in m["clips"])


def test_missing_espeak_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(ImportError, match=re.escape('pip install "multidiff[speech]"')):
        load_digits(tmp_path / "none", progress=False)
    assert not (tmp_path / "none" / "manifest.json").exists()


def test_trim_silence() -> None:
    x = np.zeros(1000, np.int16)
    x[300:400] = 1000
    x[250] = 5  # below 1% of the peak: trimmed away
    y = synth.trim_silence(x, 1000, rel_threshold=0.01, pad_s=0.01)
    assert len(y) == 120 and y[10] == 1000 and y[-11] == 1000
    assert synth.trim_silence(np.zeros(10, np.int16), 1000).size == 0


@pytest.mark.slow
def test_digits_full_default_cache(tmp_path: Path) -> None:
    pytest.importorskip("espeakng_loader")
    t0 = time.perf_counter()
    train = load_digits(tmp_path, "train", progress=False)
    built = time.perf_counter() - t0
    test = load_digits(tmp_path, "test", progress=False)
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    print(f"\nfull digits cache: {len(train)} train + {len(test)} test clips, built+loaded in {built:.1f} s, "
          f"{size / 1e6:.0f} MB")
    assert len(train) >= 3000 and len(test) >= 300
    assert not {g.split("+")[0] for g in train.groups} & {g.split("+")[0] for g in test.groups}
    assert not {g.split("+")[1] for g in train.groups} & {g.split("+")[1] for g in test.groups}
    assert Counter(train.labels.tolist()) == {d: len(train) // 10 for d in range(10)}
