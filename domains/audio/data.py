"""Spoken-digit and labelled-audio datasets as fixed-length mono clips (`AudioClips`).

Adapters: `load_digits` (embedded default, espeak-ng synthesis cached on disk, see `domains.audio.synth`),
`load_fsdd` (Free Spoken Digit Dataset v1.0.10, Jackson et al., Zenodo 10.5281/zenodo.1342401, CC BY-SA 4.0),
`load_speechcommands` (SC09 digits subset of Speech Commands v0.02, Warden 2018, arXiv:1804.03209) and
`load_folder` (one sub-folder per label).

Every adapter returns the same thing:

- mono float32 audio ``[N, 1, T]`` at ``sample_rate`` with ``T = round(seconds * sample_rate)``;
- a file at any other sample rate is always resampled, with torchaudio's windowed-sinc resampler
  (``torchaudio.transforms.Resample``: Hann window, 6 zero crossings, rolloff 0.99);
- clips shorter than ``T`` are zero-padded CENTRED (the extra sample, if odd, goes at the end); longer clips
  are centre-cropped;
- no peak normalisation: amplitudes are the file's PCM values scaled to [-1, 1] (int16 / 32768), so relative
  loudness is kept; values are clamped to [-1, 1] after resampling (sinc overshoot). The exception is a
  (float) file whose samples exceed full scale: it is scaled down to peak 1.0 (never hard-clipped), with a
  warning naming the file, its peak and the share of samples that were over full scale;
- clips are not trimmed (the digits cache is trimmed once, at synthesis).

Bad-input policy (problems are reported with `warnings.warn(..., AudioDataWarning)`):

- a file that cannot be decoded (corrupt, truncated inside its header, empty 0-byte file, not audio) is
  skipped with a warning naming the file and the decoder's reason; a file truncated inside its audio data is
  read up to where it ends (libsndfile behaviour);
- a file with NaN or infinite samples is skipped with a warning naming it, how many samples and where the
  first one is (`decode_audio` is the one reader and check for every audio input: datasets, ``--inpaint``
  clips and the WAVs `multidiff evaluate` reads);
- a file with zero frames, or silent (peak below 1e-3, i.e. -60 dBFS) is skipped with a warning naming it;
- multi-channel files are downmixed to mono by averaging channels and counted in one summary warning;
- dataset-specific skips (each warned and counted): FSDD file names not matching
  ``{digit}_{speaker}_{index}.wav``; Speech Commands names without ``_nohash_``; `load_folder` audio files at
  the top level (outside any label folder);
- after loading, one summary warning gives the totals, e.g. "skipped 3 of 120 files: 2 unreadable, 1 silent";
- a directory that yields zero usable clips raises `AudioDataError` naming the directory and the expected
  layout; a missing directory raises FileNotFoundError;
- expected, not-a-problem exclusions are documented rather than warned: Speech Commands words other than the ten
  digits (and ``_background_noise_``) are ignored by design (logged at INFO with a count), and files whose
  extension is not in ``extensions`` are not audio candidates at all;
- the digits cache is different: it is the dataset, so any missing or corrupt cached file raises
  `DigitCacheError` naming the file and how to rebuild (``rebuild=True``), never a skip.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from domains.audio.synth import (
    DEFAULT_GRID,
    DIGIT_WORDS,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    DigitCacheError,
    build_digit_cache,
    default_cache_dir,
    read_manifest,
    rebuild_hint,
)

__all__ = [
    "AudioClips",
    "AudioDataError",
    "AudioDataWarning",
    "AudioReadError",
    "ClipDataset",
    "concat_clips",
    "DecodedAudio",
    "DigitCacheError",
    "DIGIT_WORDS",
    "decode_audio",
    "fit_full_scale",
    "load_digits",
    "load_folder",
    "load_fsdd",
    "load_speechcommands",
]

logger = logging.getLogger(__name__)

SILENCE_PEAK = 1e-3
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)$")


class AudioDataWarning(UserWarning):
    """A file was skipped or altered while loading audio (see the module docstring for the policy)."""


class AudioDataError(ValueError):
    """A dataset directory yielded no usable clips, or its layout is wrong."""


class AudioReadError(ValueError):
    """An audio file that cannot be used: ``reason`` is 'unreadable', 'empty' or 'non-finite', ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(repr=False)
class DecodedAudio:
    """One decoded file: mono float32 samples as stored (channel mean), its rate, channel count and libsndfile subtype."""

    samples: np.ndarray
    sample_rate: int
    channels: int
    subtype: str

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.sample_rate

    @property
    def peak(self) -> float:
        return float(np.abs(self.samples).max())


def decode_audio(data: bytes | Path | str) -> DecodedAudio:
    """Decode a WAV/FLAC/... file (path or bytes) to mono float32, checking it can be used as audio input.

    Raises `AudioReadError` when libsndfile cannot decode it ('unreadable'), when it has no frames ('empty') or
    when any sample is NaN or infinite ('non-finite': the count and the time of the first one). Amplitudes are
    returned as stored (a float file may exceed [-1, 1]; see `fit_full_scale`).
    """
    try:
        with sf.SoundFile(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as f:
            sr, subtype = int(f.samplerate), str(f.subtype)
            x = f.read(dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several types (LibsndfileError, RuntimeError, TypeError)
        raise AudioReadError("unreadable", f"cannot decode ({type(err).__name__}: {err})") from err
    channels = x.shape[1]
    if x.shape[0] == 0:
        raise AudioReadError("empty", "no audio frames")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise AudioReadError("non-finite", f"{bad.size} of {x.shape[0]} samples are NaN or infinite "
                                           f"(the first at {bad[0] / sr:.4f} s, sample {bad[0]})")
    mono = x[:, 0] if channels == 1 else x.mean(axis=1)
    return DecodedAudio(np.ascontiguousarray(mono), sr, channels, subtype)


def fit_full_scale(samples: np.ndarray) -> tuple[np.ndarray, str | None]:
    """`samples` scaled down to peak 1.0 when they exceed full scale [-1, 1], else unchanged; with a note saying so.

    The note (None when nothing changed) gives the peak and the share of samples over full scale, e.g.
    "71.3% of the samples exceed full scale [-1, 1] (peak 50): scaled by 1/50 to peak 1.0 (not clipped)".
    """
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak <= 1.0:
        return samples, None
    over = float(np.mean(np.abs(samples) > 1.0))
    note = (f"{100 * over:.3g}% of the samples exceed full scale [-1, 1] (peak {peak:.4g}): scaled by 1/{peak:.4g} "
            f"to peak 1.0 (not clipped)")
    return (samples / np.float32(peak)).astype(np.float32), note


@dataclass(repr=False)
class AudioClips:
    """Fixed-length mono clips with integer labels, a group (speaker/voice) id and a source per clip."""

    audio: torch.Tensor  # [N, 1, T] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64
    groups: list[str]
    sample_rate: int
    class_names: list[str]
    sources: list[str]
    version: str | None = None  # the prepared data's content version (multidiff.datacache), when cached

    def __post_init__(self) -> None:
        n = self.audio.shape[0]
        if self.audio.ndim != 3 or self.audio.shape[1] != 1:
            raise ValueError(f"audio must be [N, 1, T], got {tuple(self.audio.shape)}")
        if self.labels.shape != (n,) or len(self.groups) != n or len(self.sources) != n:
            raise ValueError("audio, labels, groups and sources must have the same length")

    def __len__(self) -> int:
        return self.audio.shape[0]

    def __repr__(self) -> str:
        return (f"AudioClips(n={len(self)}, samples={self.audio.shape[-1]}, sample_rate={self.sample_rate}, "
                f"classes={len(self.class_names)}, groups={len(set(self.groups))})")

    def subset(self, idx: Sequence[int] | torch.Tensor | np.ndarray | slice) -> AudioClips:
        """The clips at `idx` (indices, boolean mask or slice), same classes and sample rate."""
        if isinstance(idx, slice):
            index = torch.arange(len(self))[idx]
        else:
            sel = torch.as_tensor(idx)
            index = torch.arange(len(self))[sel if sel.dtype == torch.bool else sel.long()].reshape(-1)
        picks = index.tolist()
        return AudioClips(audio=self.audio[index], labels=self.labels[index], groups=[self.groups[i] for i in picks],
                          sample_rate=self.sample_rate, class_names=list(self.class_names),
                          sources=[self.sources[i] for i in picks], version=self.version)


def concat_clips(parts: Sequence[AudioClips]) -> AudioClips:
    """The clips of several sets one after the other; they must share sample rate, clip length and class names.
    The version is a hash of the parts' versions (None when any part has none)."""
    if not parts:
        raise ValueError("concat_clips needs at least one AudioClips")
    first = parts[0]
    for p in parts[1:]:
        if p.sample_rate != first.sample_rate or p.audio.shape[-1] != first.audio.shape[-1]:
            raise ValueError(f"cannot concatenate clips of {p.audio.shape[-1]} samples at {p.sample_rate} Hz with "
                             f"clips of {first.audio.shape[-1]} samples at {first.sample_rate} Hz")
        if list(p.class_names) != list(first.class_names):
            raise ValueError(f"cannot concatenate clips with classes {p.class_names} and {first.class_names}")
    versions = [p.version for p in parts]
    version = (hashlib.sha256("|".join(versions).encode()).hexdigest()[:16]  # type: ignore[arg-type]
               if all(v is not None for v in versions) else None)
    if len(parts) == 1:
        version = first.version
    return AudioClips(audio=torch.cat([p.audio for p in parts]), labels=torch.cat([p.labels for p in parts]),
                      groups=[g for p in parts for g in p.groups], sample_rate=first.sample_rate,
                      class_names=list(first.class_names), sources=[s for p in parts for s in p.sources],
                      version=version)


class ClipDataset(torch.utils.data.Dataset):
    """`AudioClips` as a torch Dataset of ``(audio [1, T], label)``; optional random time shift (off by default)."""

    def __init__(self, clips: AudioClips, max_shift: int = 0) -> None:
        self.clips = clips
        self.max_shift = int(max_shift)  # samples; each item is shifted by U{-max_shift..max_shift}, zero-filled

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.clips.audio[i]
        if self.max_shift > 0:
            shift = int(torch.randint(-self.max_shift, self.max_shift + 1, ()))
            if shift:
                out = torch.zeros_like(x)
                if shift > 0:
                    out[:, shift:] = x[:, :-shift]
                else:
                    out[:, :shift] = x[:, -shift:]
                x = out
        return x, self.clips.labels[i]


class _Unusable(Exception):
    """A file that is skipped; args = (reason key, human-readable detail)."""


class _LoadReport:
    """Per-load bookkeeping of skipped and downmixed files, reported through AudioDataWarning."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.downmixed = 0

    def skip(self, path: Path, reason: str, detail: str, stacklevel: int = 4) -> None:
        """Warn about one skipped file and count it (`stacklevel` 4 = the loader's caller via `_load_items`)."""
        self.skipped[reason] += 1
        warnings.warn(f"skipping {path}: {detail}", AudioDataWarning, stacklevel=stacklevel)

    def finish(self, expected: str, stacklevel: int = 4) -> None:
        """Emit the summary warnings; raise AudioDataError when nothing was usable."""
        if self.downmixed:
            warnings.warn(f"{self.where}: downmixed {self.downmixed} of {self.seen} files to mono (channel mean)",
                          AudioDataWarning, stacklevel=stacklevel)
        n = sum(self.skipped.values())
        if n:
            parts = ", ".join(f"{k} {r}" for r, k in sorted(self.skipped.items(), key=lambda t: (-t[1], t[0])))
            warnings.warn(f"{self.where}: skipped {n} of {self.seen} files: {parts}", AudioDataWarning,
                          stacklevel=stacklevel)
        if self.seen == n:
            found = f"{self.seen} candidate files, none usable" if self.seen else "no candidate files"
            raise AudioDataError(f"no usable clips in {self.where} ({found}); expected {expected}")


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    """A cached resampler, so the sinc kernel is built once per rate pair."""
    return torchaudio.transforms.Resample(orig, new)


def _decode(data: bytes | Path) -> DecodedAudio:
    """`decode_audio` plus the datasets' silence rule; `_Unusable` if the file is skipped."""
    try:
        audio = decode_audio(data)
    except AudioReadError as err:
        raise _Unusable(err.reason, err.detail) from err
    peak = audio.peak
    if peak < SILENCE_PEAK:
        raise _Unusable("silent", f"silent (peak {peak:.2e} < {SILENCE_PEAK:g})")
    return audio


def _place(x: torch.Tensor, out: torch.Tensor) -> None:
    """Write 1-D `x` into zeroed 1-D `out`, centre-cropped or centre-zero-padded (odd extra sample at the end)."""
    n, length = x.shape[-1], out.shape[-1]
    if n >= length:
        start = (n - length) // 2
        out.copy_(x[start:start + length])
    else:
        left = (length - n) // 2
        out[left:left + n] = x


def _to_clips(signals: Sequence[tuple[np.ndarray, int]], sample_rate: int, length: int,
              batch: int = 64) -> torch.Tensor:
    """Resample mono ``(samples, rate)`` signals to `sample_rate` and fit them to ``[N, 1, length]``.

    Signals are resampled in batches of similar length, zero-padded at the end: resampling is linear and
    torchaudio pads with zeros itself, so each clip's first ``ceil(n * new / orig)`` outputs are the same as
    resampling it alone, at a fraction of the per-call overhead.
    """
    out = torch.zeros(len(signals), 1, length)
    by_rate: dict[int, list[int]] = {}
    for i, (x, sr) in enumerate(signals):
        by_rate.setdefault(sr, []).append(i)
    for sr, idx in by_rate.items():
        idx.sort(key=lambda i: signals[i][0].shape[0])
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            longest = signals[chunk[-1]][0].shape[0]
            rows = np.zeros((len(chunk), longest), dtype=np.float32)
            for row, i in enumerate(chunk):
                x = signals[i][0]
                rows[row, :x.shape[0]] = x
            padded = torch.from_numpy(rows)
            if sr != sample_rate:
                padded = _resampler(sr, sample_rate)(padded)
            for row, i in enumerate(chunk):
                n = -(-signals[i][0].shape[0] * sample_rate // sr)  # ceil, torchaudio's output length
                _place(padded[row, :n], out[i, 0])
    return out.clamp_(-1.0, 1.0)  # windowed-sinc resampling can overshoot full scale slightly


def _num_samples(sample_rate: int, seconds: float) -> int:
    """Clip length in samples; validates the arguments."""
    if sample_rate <= 0 or seconds <= 0:
        raise ValueError(f"sample_rate and seconds must be positive, got {sample_rate}, {seconds}")
    return int(round(seconds * sample_rate))


def _load_items(items: Iterable[tuple[Path, int, str]], report: _LoadReport, class_names: list[str],
                sample_rate: int, seconds: float, expected: str, synced: Any = None,
                root: Path | None = None, headers_only: bool = False) -> AudioClips:
    """Read ``(path, label, group)`` items into AudioClips, applying the bad-input policy; with ``synced`` (a
    `multidiff.datacache.SyncResult` of ``root``) each clip comes from the prepared-data cache instead."""
    length = _num_samples(sample_rate, seconds)
    signals: list[tuple[np.ndarray, int]] = []
    cached: list[str] = []  # files whose clip comes from the cache
    labels, groups, sources = [], [], []
    for path, label, group in items:
        report.seen += 1
        if synced is not None:
            rel = _rel(path, root)
            entry = synced.entries[rel]
            meta = entry["meta"]
            if "skip" in meta:
                report.skip(path, *meta["skip"])
                continue
            report.downmixed += meta["channels"] > 1
            if meta.get("note"):
                warnings.warn(f"{path}: {meta['note']}", AudioDataWarning, stacklevel=3)
            cached.append(rel)
        else:
            try:
                audio = _decode(path)
            except _Unusable as bad:
                report.skip(path, *bad.args)
                continue
            report.downmixed += audio.channels > 1
            mono, note = fit_full_scale(audio.samples)
            if note is not None:
                warnings.warn(f"{path}: {note}", AudioDataWarning, stacklevel=3)
            signals.append((mono, audio.sample_rate))
        labels.append(label)
        groups.append(group)
        sources.append(str(path))
    report.finish(expected)
    if synced is not None:  # headers_only: labels, groups and sources of the cached clips, no audio (length 0)
        audio_t = torch.zeros(len(cached), 1, 0) if headers_only else synced.stack("audio", cached)
    else:
        audio_t = _to_clips(signals, sample_rate, length)
    return AudioClips(audio=audio_t, labels=torch.tensor(labels, dtype=torch.int64), groups=groups,
                      sample_rate=sample_rate, class_names=class_names, sources=sources,
                      version=synced.version if synced is not None else None)


# --- prepared-data cache (change data capture, multidiff.datacache) ---------------------------------------------------

FILE_CACHE_KIND = "audio_files"
FILE_CACHE_VERSION = "audio-clip-v1"  # bump when the per-file processing below changes


def _process_file(data: bytes, sample_rate: int, length: int) -> Any:
    """One file -> its cached clip ``[1, 1, length]`` (decode, scale to full scale, resample, centre), alone."""
    from multidiff.datacache import FileResult

    try:
        audio = _decode(data)
    except _Unusable as bad:
        return FileResult(None, {"skip": list(bad.args)})
    mono, note = fit_full_scale(audio.samples)
    return FileResult({"audio": _to_clips([(mono, audio.sample_rate)], sample_rate, length)},
                      {"channels": audio.channels, "note": note})


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (a string slice for paths listed under root: 3,000 a sync)."""
    text, prefix = str(path), str(root) + os.sep
    return (text[len(prefix):] if text.startswith(prefix) else path.relative_to(root).as_posix()).replace(os.sep, "/")


def _is_synced(cache: Any) -> bool:
    """Whether a loader's ``cache`` argument is a `SyncResult` to reuse (rather than True / False)."""
    return not isinstance(cache, bool) and hasattr(cache, "entries")


def sync_files(root: Path, paths: Iterable[Path], sample_rate: int, seconds: float, *, rebuild: bool = False) -> Any:
    """Bring the prepared-data cache of ``root`` in line with ``paths``: only added / changed files are decoded and
    resampled, removed ones dropped (`multidiff.datacache.ContentIndexCache`); returns the `SyncResult`."""
    from multidiff.datacache import ContentIndexCache

    length = _num_samples(sample_rate, seconds)
    cache = ContentIndexCache.for_folder(FILE_CACHE_KIND, root, {"processing": FILE_CACHE_VERSION,
                                                                 "sample_rate": sample_rate, "seconds": seconds})
    files = {_rel(p, root): p for p in paths}
    return cache.sync(files, lambda rel, data: _process_file(data, sample_rate, length), rebuild=rebuild)


def _existing_dir(root: str | Path, what: str) -> Path:
    """`root` as a Path, or FileNotFoundError naming it."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    """ValueError unless `split` is one of `allowed`."""
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def load_fsdd(root: str | Path, split: str = "train", sample_rate: int = 16000, seconds: float = 1.0,
              cache: Any = False, sync_only: bool = False, headers_only: bool = False) -> Any:
    """Free Spoken Digit Dataset (v1.0.10, CC BY-SA 4.0) from ``root/recordings``; takes 0-4 are the test split.
    ``cache``: clips come from the folder's prepared-data cache, updated for changed files only (`sync_files`);
    ``cache`` may also be the `SyncResult` of an earlier sync of this folder (reused, not synced again);
    ``sync_only``: only sync that cache and return its `SyncResult` (what ``multidiff data`` reports);
    ``headers_only``: with ``cache``, clips without audio (length 0): labels, groups, sources only."""
    _check_split(split, ("train", "test"))
    root = _existing_dir(root, "FSDD")
    rec = root / "recordings" if (root / "recordings").is_dir() else root
    report = _LoadReport(rec)
    items, every = [], []
    with os.scandir(rec) as listing:  # like rec.glob("*.wav"), a fraction of the time for 3,000 files
        wavs = sorted(entry.name for entry in listing if entry.name.endswith(".wav") and entry.is_file())
    for name in wavs:
        path = rec / name
        m = _FSDD_NAME.match(name[:-4])
        if m is None:
            report.seen += 1
            report.skip(path, "misnamed", "name is not {digit}_{speaker}_{index}.wav", stacklevel=3)
            continue
        every.append(path)
        digit, speaker, take = int(m[1]), m[2], int(m[3])
        if (take < 5) == (split == "test"):
            items.append((path, digit, speaker))
    synced = cache if _is_synced(cache) else (
        sync_files(rec, every, sample_rate, seconds) if cache or sync_only else None)
    if sync_only:
        return synced
    return _load_items(items, report, list(DIGIT_WORDS), sample_rate, seconds,
                       "FSDD recordings named {digit}_{speaker}_{index}.wav", synced, rec, headers_only)


def _read_list(path: Path) -> set[str]:
    """Relative paths listed in a Speech Commands split file."""
    if not path.is_file():
        raise FileNotFoundError(f"Speech Commands split list not found: {path} (expected the official v0.02 layout)")
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def load_speechcommands(root: str | Path, split: str = "train", sample_rate: int = 16000,
                        seconds: float = 1.0, cache: Any = False, sync_only: bool = False,
              headers_only: bool = False) -> Any:
    """SC09: the digit words of Speech Commands v0.02 (Warden 2018), split by the official validation/testing lists."""
    _check_split(split, ("train", "validation", "test"))
    root = _existing_dir(root, "Speech Commands")
    listed = {"validation": _read_list(root / "validation_list.txt"), "test": _read_list(root / "testing_list.txt")}
    report = _LoadReport(root)
    items, every = [], []
    others: Counter[str] = Counter()
    for word_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if word_dir.name not in DIGIT_WORDS:
            others[word_dir.name] = sum(1 for _ in word_dir.glob("*.wav"))
            continue
        label = DIGIT_WORDS.index(word_dir.name)
        for path in sorted(word_dir.glob("*.wav")):
            rel = f"{word_dir.name}/{path.name}"
            if "_nohash_" in path.stem:
                every.append(path)
            in_split = ("validation" if rel in listed["validation"] else
                        "test" if rel in listed["test"] else "train")
            if in_split != split:
                continue
            if "_nohash_" not in path.stem:
                report.seen += 1
                report.skip(path, "misnamed", "name is not <speaker>_nohash_<n>.wav", stacklevel=3)
                continue
            items.append((path, label, path.stem.split("_nohash_")[0]))
    if others:
        logger.info("%s: ignored %d files in %d non-digit folders (%s)", root, sum(others.values()), len(others),
                    ", ".join(sorted(others)))
    synced = cache if _is_synced(cache) else (
        sync_files(root, every, sample_rate, seconds) if cache or sync_only else None)
    if sync_only:
        return synced
    return _load_items(items, report, list(DIGIT_WORDS), sample_rate, seconds,
                       f"<word>/<speaker>_nohash_<n>.wav files for the digit words in the {split!r} split", synced, root,
                       headers_only)


def load_folder(root: str | Path, sample_rate: int = 16000, seconds: float = 1.0,
                extensions: Sequence[str] = (".wav", ".flac"), cache: Any = False, sync_only: bool = False,
              headers_only: bool = False) -> Any:
    """Audio files under ``root/<label>/`` (searched recursively); class names are the sorted label folder names.

    The group of a file in a nested folder ``<label>/<group>/...`` is ``<group>``; files directly in
    ``<label>/`` get group ``"unknown"``. Hidden folders (``.name``) are not labels.
    """
    root = _existing_dir(root, "audio")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    report = _LoadReport(root)
    expected = f"one sub-folder per label holding {'/'.join(sorted(exts))} files"
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts):
        report.seen += 1
        report.skip(path, "outside a label folder", "audio file outside any label folder", stacklevel=3)
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in exts
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for path in files:
            rel = path.relative_to(root / name).parts
            items.append((path, label, rel[0] if len(rel) > 1 else "unknown"))
    if not class_names:
        report.finish(expected, stacklevel=3)  # raises: no label folders means nothing usable
    synced = cache if _is_synced(cache) else (
        sync_files(root, [p for p, _, _ in items], sample_rate, seconds) if cache or sync_only else None)
    if sync_only:
        return synced
    clips = _load_items(items, report, class_names, sample_rate, seconds, expected, synced, root, headers_only)
    empty = [n for i, n in enumerate(class_names) if not bool((clips.labels == i).any())]
    if empty:
        warnings.warn(f"{root}: label folders with no usable clips: {empty}", AudioDataWarning, stacklevel=2)
    return clips


def load_digits(cache_dir: str | Path | None = None, split: str = "train", sample_rate: int = 16000,
                seconds: float = 1.0, progress: bool = True, num_voices: int | None = None,
                rebuild: bool = False) -> AudioClips:
    """Spoken digits synthesised offline with espeak-ng (the embedded default), built once into a cache dir.

    The first call (or ``rebuild=True``) synthesises `DEFAULT_GRID` (first `num_voices` voices of each split
    when given) into `cache_dir` (default ``$MULTIDIFF_CACHE/audio_digits`` or
    ``~/.cache/multidiff/audio_digits``); later calls only read it. ``split`` is "train" or "test" (test voices
    have held-out accents and variants). ``num_voices`` on an existing cache selects the first voices of
    each split in the manifest's order. Groups are espeak voice names ("en-us+f3"); sources are file paths.
    """
    _check_split(split, ("train", "test"))
    length = _num_samples(sample_rate, seconds)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if rebuild or not (cache / MANIFEST_NAME).exists():
        build_digit_cache(cache, DEFAULT_GRID, num_voices=num_voices, progress=progress)
    manifest = read_manifest(cache)
    if manifest.get("generator_version") != GENERATOR_VERSION:
        warnings.warn(f"digits cache {cache} was made by generator version {manifest.get('generator_version')} "
                      f"(current {GENERATOR_VERSION}); using it as is, {rebuild_hint(cache)} to update",
                      AudioDataWarning, stacklevel=2)
    voices: list[str] = manifest["split"][f"{split}_voices"]
    if num_voices is not None:
        if num_voices > len(voices):
            raise DigitCacheError(f"{cache} holds {len(voices)} {split} voices, fewer than num_voices={num_voices}; "
                                  f"{rebuild_hint(cache)}")
        voices = voices[:num_voices]
    elif manifest.get("num_voices") is not None:
        warnings.warn(f"digits cache {cache} was built with num_voices={manifest['num_voices']} (a partial grid); "
                      f"{rebuild_hint(cache)} for the full dataset", AudioDataWarning, stacklevel=2)
    keep = set(voices)
    entries = [e for e in manifest["clips"] if e["split"] == split and e["voice"] in keep]
    if not entries:
        raise DigitCacheError(f"digits manifest in {cache} lists no {split} clips; {rebuild_hint(cache)}")
    signals: list[tuple[np.ndarray, int]] = []
    for e in entries:
        path = cache / e["file"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DigitCacheError(f"cached digit clip missing or unreadable: {path} ({err}); "
                                  f"{rebuild_hint(cache)}") from err
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise DigitCacheError(f"cached digit clip is corrupt (sha256 differs from the manifest): {path}; "
                                  f"{rebuild_hint(cache)}")
        try:
            audio = _decode(data)
        except _Unusable as bad:
            raise DigitCacheError(f"cached digit clip {path} is unusable ({bad.args[1]}); "
                                  f"{rebuild_hint(cache)}") from bad
        signals.append((audio.samples, audio.sample_rate))
    return AudioClips(audio=_to_clips(signals, sample_rate, length),
                      labels=torch.tensor([e["digit"] for e in entries], dtype=torch.int64),
                      groups=[e["voice"] for e in entries], sample_rate=sample_rate,
                      class_names=list(DIGIT_WORDS), sources=[str(cache / e["file"]) for e in entries])

