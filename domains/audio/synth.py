"""Offline spoken-digit synthesis with espeak-ng, the engine behind the embedded ``digits`` dataset.

espeak-ng (GPL-3.0) comes from the optional ``espeakng-loader`` wheel (``pip install "multidiff[speech]"``),
which bundles ``libespeak-ng`` and its voice data; it is driven here through ``ctypes`` in synchronous
retrieval mode (``AUDIO_OUTPUT_SYNCHRONOUS`` + a synth callback), so nothing is played or spawned.

Dataset recipe (`DEFAULT_GRID`): the words "zero".."nine", each spoken by every *voice* = English accent
(``en-us``, ``en`` ...) + voice variant (``m1``, ``f3``, ``klatt``, ``whisper`` ...), at every espeak pitch x rate
of the grid. The test split is a fixed hold-out of accents AND variants: a test voice combines a test accent
with a test variant, so no test clip shares its accent or its variant with any training clip (voices that mix
a train accent with a test variant are not generated). Default: 6x20 train voices and 2x6 test voices, 2
pitches x 2 rates -> 4,800 train and 480 test clips.

Each clip is espeak's native 22,050 Hz int16 output with leading/trailing silence trimmed (threshold 1% of
the clip's peak, 10 ms kept either side), stored losslessly as a 16-bit PCM WAV. espeak's output is not
bit-for-bit reproducible, so the cache IS the dataset: `build_digit_cache` writes every clip atomically
(``multidiff.files.atomic_write``) and writes ``manifest.json`` (one entry per clip with digit, voice, variant,
pitch, rate, file and sha256, plus the grid, split and versions) last, so an interrupted build leaves no
manifest and therefore no half-valid cache. Loading (``domains.audio.data.load_digits``) never regenerates an
existing cache; it verifies every file against the manifest.

This module needs only numpy and soundfile (no torch), so generation worker processes start quickly.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import soundfile as sf

from multidiff.files import atomic_write
from multidiff.progress import progress_bar

GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "multidiff-audio-digits"
CLIPS_DIR = "clips"
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRIM_REL_THRESHOLD = 0.01
TRIM_PAD_S = 0.01
INSTALL_HINT = 'espeak-ng synthesis needs the optional GPL-3.0 extra: pip install "multidiff[speech]"'

# speak_lib.h constants (espeak-ng 1.52).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_EE_OK = 0
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class DigitCacheError(RuntimeError):
    """The digits cache on disk is missing, incomplete or corrupt (the message says how to rebuild it)."""


def rebuild_hint(cache_dir: Path) -> str:
    """How to rebuild a digits cache, for error messages."""
    return f"rebuild it with load_digits(cache_dir={str(cache_dir)!r}, rebuild=True) (CLI: --rebuild)"


def require_espeak() -> ModuleType:
    """Import `espeakng_loader` or raise an ImportError that says how to install it."""
    try:
        import espeakng_loader
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return espeakng_loader


def espeak_versions() -> dict[str, str]:
    """Versions of the espeakng-loader wheel and of the libespeak-ng it bundles."""
    require_espeak()
    return {"espeakng_loader": metadata.version("espeakng-loader"), "espeak_ng": get_engine().version}


def default_cache_dir() -> Path:
    """``$MULTIDIFF_CACHE/audio_digits``, else ``~/.cache/multidiff/audio_digits``."""
    root = os.environ.get("MULTIDIFF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "multidiff") / "audio_digits"


class EspeakEngine:
    """ctypes binding to the bundled libespeak-ng in synchronous retrieval mode (one per process)."""

    def __init__(self) -> None:
        loader = require_espeak()
        lib = ctypes.CDLL(loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data at {loader.get_data_path()}")
        self.sample_rate: int = rate
        self.version: str = (lib.espeak_Info(None) or b"unknown").decode()
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._voice: str | None = None
        self._callback = _SYNTH_CALLBACK(self._collect)  # must outlive every espeak_Synth call
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, num_samples: int, events: Any) -> int:
        """Synth callback: copy each audio chunk out of espeak's buffer; 0 means carry on."""
        if num_samples > 0 and wav:
            self._chunks.append(np.frombuffer(ctypes.string_at(wav, 2 * num_samples), dtype=np.int16))
        return 0

    def synthesize(self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50,
                   volume: int = 100) -> np.ndarray:
        """Speak `text` with `voice` (e.g. "en-us+f3"); int16 samples at `sample_rate` (22,050 Hz)."""
        if voice != self._voice:  # loading a voice is the slowest step; parameters below survive it
            self._voice = None
            if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self._voice = voice
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range),
                             (_PARAM_VOLUME, volume)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        data = text.encode() + b"\0"
        self._chunks = []
        err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {err} for {text!r} / {voice!r}")
        self._lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


_ENGINE: EspeakEngine | None = None


def get_engine() -> EspeakEngine:
    """The process-wide espeak engine (libespeak-ng has global state, so one per process)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = EspeakEngine()
    return _ENGINE


def trim_silence(x: np.ndarray, sample_rate: int, rel_threshold: float = TRIM_REL_THRESHOLD,
                 pad_s: float = TRIM_PAD_S) -> np.ndarray:
    """Cut leading/trailing samples below `rel_threshold` x peak, keeping `pad_s` seconds either side."""
    mag = np.abs(x.astype(np.int32) if x.dtype == np.int16 else x)
    if mag.size == 0 or mag.max() == 0:
        return x[:0]
    loud = np.flatnonzero(mag > rel_threshold * mag.max())
    pad = int(round(pad_s * sample_rate))
    return x[max(0, loud[0] - pad): loud[-1] + 1 + pad]


@dataclass(frozen=True)
class ClipSpec:
    """One clip of the grid: a digit spoken by one voice at one pitch and rate."""

    digit: int
    accent: str
    variant: str
    pitch: int
    rate: int
    split: str

    @property
    def voice(self) -> str:
        """espeak voice name and group id, e.g. "en-us+f3"."""
        return f"{self.accent}+{self.variant}"

    @property
    def file(self) -> str:
        """Path of the clip relative to the cache directory."""
        return f"{CLIPS_DIR}/{self.voice}/{self.digit}_{DIGIT_WORDS[self.digit]}_p{self.pitch}_r{self.rate}.wav"


@dataclass(frozen=True)
class DigitGrid:
    """The synthesis grid: accents x variants x pitches x rates, with held-out test accents and variants."""

    train_accents: tuple[str, ...]
    test_accents: tuple[str, ...]
    train_variants: tuple[str, ...]
    test_variants: tuple[str, ...]
    pitches: tuple[int, ...] = (35, 65)
    rates: tuple[int, ...] = (150, 190)
    volume: int = 80  # espeak's default 100 clips a few loud voices at int16 full scale

    def __post_init__(self) -> None:
        if set(self.train_accents) & set(self.test_accents) or set(self.train_variants) & set(self.test_variants):
            raise ValueError("train and test accents/variants must be disjoint")

    def voices(self, split: str) -> list[tuple[str, str]]:
        """(accent, variant) pairs of a split, in a fixed shuffled order so any prefix is diverse."""
        accents, variants = (self.train_accents, self.train_variants) if split == "train" else (
            self.test_accents, self.test_variants)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        pairs = [(a, v) for v in variants for a in accents]
        random.Random(0).shuffle(pairs)
        return pairs

    def specs(self, num_voices: int | None = None) -> list[ClipSpec]:
        """Every clip of the grid (first `num_voices` voices of each split when given)."""
        out = []
        for split in ("train", "test"):
            for accent, variant in self.voices(split)[:num_voices]:
                out += [ClipSpec(d, accent, variant, p, r, split)
                        for p in self.pitches for r in self.rates for d in range(len(DIGIT_WORDS))]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DigitGrid:
        """Inverse of `to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


DEFAULT_GRID = DigitGrid(
    train_accents=("en-us", "en", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"),
    test_accents=("en-gb-scotland", "en-us-nyc"),
    train_variants=("m1", "m2", "m4", "m5", "m6", "m8", "f1", "f3", "f5", "Annie", "belinda", "grandma", "steph",
                    "klatt", "klatt4", "croak", "whisper", "Andy", "david", "john"),
    test_variants=("m3", "m7", "f2", "f4", "linda", "klatt2"),
)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _render(cache_dir: Path, specs: Sequence[ClipSpec], volume: int) -> list[dict[str, Any]]:
    """Synthesise, trim and store `specs`; return their manifest entries."""
    engine = get_engine()
    entries = []
    for s in specs:
        wave = trim_silence(engine.synthesize(DIGIT_WORDS[s.digit], s.voice, rate=s.rate, pitch=s.pitch,
                                              volume=volume), engine.sample_rate)
        if wave.size == 0:
            raise RuntimeError(f"espeak-ng produced silence for {s}")
        buf = io.BytesIO()
        sf.write(buf, wave, engine.sample_rate, format="WAV", subtype="PCM_16")
        data = buf.getvalue()
        path = cache_dir / s.file
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, durable=False)
        entries.append({"digit": s.digit, "word": DIGIT_WORDS[s.digit], "voice": s.voice, "accent": s.accent,
                        "variant": s.variant, "pitch": s.pitch, "rate": s.rate, "split": s.split, "file": s.file,
                        "num_samples": int(wave.size), "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def _render_task(args: tuple[str, list[ClipSpec], int]) -> list[dict[str, Any]]:
    """Process-pool entry point for `_render` (one voice per task)."""
    cache_dir, specs, volume = args
    return _render(Path(cache_dir), specs, volume)


def build_digit_cache(cache_dir: str | Path, grid: DigitGrid = DEFAULT_GRID, num_voices: int | None = None,
                      progress: bool = True, workers: int | None = None) -> dict[str, Any]:
    """Synthesise the grid into `cache_dir` (clips first, manifest last) and return the manifest."""
    require_espeak()
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the cache is invalid until the end
    specs = grid.specs(num_voices)
    by_voice: dict[str, list[ClipSpec]] = {}
    for s in specs:
        by_voice.setdefault(s.voice, []).append(s)
    tasks = [(str(cache_dir), v, grid.volume) for v in by_voice.values()]
    workers = min(os.cpu_count() or 1, 2) if workers is None else max(1, workers)
    workers = min(workers, len(tasks))
    versions = espeak_versions()
    t0 = time.perf_counter()
    bar = progress_bar("synthesising digits", len(specs), enabled=progress, extra=("{task.fields[rate]}",), eta=False,
                       rate="")
    entries: list[dict[str, Any]] = []

    def advance(n: int) -> None:
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.update(advance=n, rate=f"{(bar.completed + n) / elapsed:6.0f} clips/s")

    try:
        if workers == 1:
            results: Iterable[list[dict[str, Any]]] = (_render_task(t) for t in tasks)
            for res in results:
                entries += res
                advance(len(res))
        else:
            # spawn: the parent may hold torch's thread pools, which fork does not copy safely.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for res in pool.map(_render_task, tasks):
                    entries += res
                    advance(len(res))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    order = {s.file: i for i, s in enumerate(specs)}
    entries.sort(key=lambda e: order[e["file"]])
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "espeakng_loader_version": versions["espeakng_loader"],
        "espeak_ng_version": versions["espeak_ng"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "generation_seconds": round(seconds, 3),
        "workers": workers,
        "sample_rate": get_engine().sample_rate,
        "trim": {"rel_threshold": TRIM_REL_THRESHOLD, "pad_s": TRIM_PAD_S},
        "grid": grid.to_dict(),
        "num_voices": num_voices,
        "split": {
            "method": "held-out accents and variants: test voices = test_accents x test_variants",
            "train_voices": [f"{a}+{v}" for a, v in grid.voices("train")[:num_voices]],
            "test_voices": [f"{a}+{v}" for a, v in grid.voices("test")[:num_voices]],
        },
        "clips": entries,
    }
    atomic_write(cache_dir / MANIFEST_NAME, json.dumps(manifest, indent=1), durable=False)
    _remove_orphans(cache_dir, {e["file"] for e in entries})
    return manifest


def _remove_orphans(cache_dir: Path, keep: set[str]) -> None:
    """Delete clip files (and empty voice folders) under ``clips/`` that the new manifest does not list."""
    clips = cache_dir / CLIPS_DIR
    if not clips.is_dir():
        return
    for path in clips.rglob("*"):
        if path.is_file() and path.relative_to(cache_dir).as_posix() not in keep:
            path.unlink()
    for sub in sorted((p for p in clips.iterdir() if p.is_dir()), reverse=True):
        if not any(sub.iterdir()):
            shutil.rmtree(sub)


_ENTRY_KEYS = ("digit", "word", "voice", "accent", "variant", "pitch", "rate", "split", "file", "num_samples",
               "sha256")


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Parse and structurally validate ``manifest.json`` (DigitCacheError naming the problem otherwise)."""
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DigitCacheError(f"no digits manifest at {path}; {rebuild_hint(cache_dir)}") from err
    except (OSError, ValueError) as err:
        raise DigitCacheError(f"unreadable digits manifest {path} ({err}); {rebuild_hint(cache_dir)}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DigitCacheError(f"{path} is not a multidiff digits manifest; {rebuild_hint(cache_dir)}")
    clips = manifest.get("clips")
    if not isinstance(clips, list) or not clips or not isinstance(manifest.get("sample_rate"), int):
        raise DigitCacheError(f"digits manifest {path} has no clips or no sample_rate; {rebuild_hint(cache_dir)}")
    split = manifest.get("split")
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train_voices", "test_voices")):
        raise DigitCacheError(f"digits manifest {path} lacks the train/test voice split; {rebuild_hint(cache_dir)}")
    for i, entry in enumerate(clips):
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        if missing:
            raise DigitCacheError(f"digits manifest {path}: clip #{i} lacks {missing}; {rebuild_hint(cache_dir)}")
    return manifest
