"""The audio domain: class-conditional diffusion on raw waveforms (DiffWave, Kong et al. 2021), with CFG and inpainting.

x is a mono waveform ``[B, 1, T]`` (``T = seconds * sample_rate``) in [-1, 1] living in Euclidean space; the
condition is ``{"label": LongTensor [B]}`` with a learned null class for classifier-free guidance
(Ho & Salimans 2022). The backbone is `domains.audio.unet.UNet1D`; the defaults are v-prediction
(Salimans & Ho 2022) on a cosine schedule with 10% condition dropout.

    multidiff data audio                                   # build the espeak digits cache
    multidiff train audio --config fast --max-minutes 20 --out runs/audio
    multidiff sample audio --checkpoint runs/audio --label 7 --num 16 --guidance 2 --out samples/seven
    multidiff sample audio --inpaint clip.wav --mask 0.3:0.5 --label seven --num 4 --out samples/fill
    multidiff evaluate audio samples/seven
    multidiff train audio --config classifier --out runs/audio_clf   # the digit classifier used by evaluate

Samples are written as one WAV per sample (``sample_000_label7.wav``), ``spectrograms.png`` and ``labels.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from multidiff.config import positive
from multidiff.registry import Domain, RunConfig, SampleRequest
from multidiff.spaces import Euclidean, Space

__all__ = [
    "AudioDomain",
    "AudioData",
    "AudioMetricsWarning",
    "AudioModel",
    "ClassifierLoss",
    "classifier_class_names",
    "DEFAULT_CLASSIFIER",
    "InputClip",
    "load_any_classifier",
    "export_classifier",
    "match_classes",
    "parse_span",
    "read_clip",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLASSIFIER = REPO_ROOT / "data" / "checkpoints" / "audio_classifier.safetensors"
LABELS_FILE = "labels.json"
GRID_FILE = "spectrograms.png"
_SAMPLE_NAME = re.compile(r"^sample_(\d+)(?:_label(\d+))?\.wav$")
_SPLITS = {  # the split names of the core -> the split of each source ('folder' has a single split)
    "digits": {"train": "train", "valid": "test", "validation": "test", "test": "test"},
    "fsdd": {"train": "train", "valid": "test", "validation": "test", "test": "test"},
    "speechcommands": {"train": "train", "valid": "validation", "validation": "validation", "test": "test"},
}


@dataclass
class AudioData:
    """Which clips to train on, their rate and length, and the classifier used for metrics."""

    source: Literal["digits", "fsdd", "speechcommands", "folder"] = "digits"
    root: str | None = None  # dataset directory (fsdd, speechcommands, folder)
    sample_rate: int = positive(16000)
    seconds: float = positive(1.0)
    max_clips: int | None = positive(None)  # a random subset of this many clips per split (quick runs)
    cache_dir: str | None = None  # digits cache (default $MULTIDIFF_CACHE/audio_digits or ~/.cache/multidiff/...)
    num_voices: int | None = positive(None)  # digits: the first voices of each split only
    max_shift: int = 0  # training augmentation: random time shift of up to this many samples
    class_names: list[str] | None = None  # label names; null = from the data (folder: sorted sub-folder names)
    classifier: str | None = None  # digit-classifier checkpoint for metrics (default data/checkpoints/audio_classifier.safetensors)
    wav_format: Literal["auto", "pcm16", "float"] = "auto"  # auto: 16-bit PCM, float when inpainting a non-16-bit clip
    seed: int = 0  # of the max_clips subset
    # more labelled sources {source: root} whose train split joins data.source's in training (same classes, e.g.
    # {fsdd: DIR, speechcommands: DIR} for the digit classifier); evaluation splits stay data.source's
    extra_sources: dict[str, str] = field(default_factory=dict)
    # latent diffusion (issue #17): an autoencoder file or run (`--config autoencoder`, exported); the denoiser then
    # works on its normalised latents and `sample` decodes them to WAV. latent_stats is filled by `resolve` (the
    # autoencoder's channels, compression, rate and weight fingerprint + per-channel latent mean/std) and is what a
    # different autoencoder file at that path is checked against.
    latent: str | None = None
    latent_stats: dict[str, Any] | None = None


@dataclass
class AudioModel:
    """UNet1D hyper-parameters (kind=denoiser) or DigitClassifier ones (kind=classifier)."""

    kind: Literal["denoiser", "classifier", "autoencoder"] = "denoiser"
    channels: int = positive(48)
    multipliers: tuple[int, ...] = positive((1, 2, 4))
    factors: tuple[int, ...] = positive((1, 4, 5))
    blocks: tuple[int, ...] = (1, 2, 2)
    attention_levels: tuple[int, ...] | None = None
    heads: int = positive(4)
    patch: int = positive(16)
    patch_overlap: bool = True
    full_rate_channels: int = 0  # >0: a thin full-rate level around the patchify (see UNet1D)
    kernel_size: int = positive(3)
    dropout: float = 0.0
    # kind=classifier
    classifier_channels: tuple[int, ...] = positive((16, 32, 64, 128, 128))
    n_mels: int = positive(64)
    embed_dim: int = positive(128)
    classifier_dropout: float = 0.3
    # training augmentation (domains.audio.augment): true = all, false = none, or a list of
    # speed, reverb, gain, noise, telephone, spectrogram
    augment: bool | tuple[str, ...] = True
    label_smoothing: float = 0.0
    # kind=autoencoder (domains.audio.autoencoder): widths per level, even strides (compression = their product)
    ae_channels: tuple[int, ...] = positive((16, 32, 64, 128, 256))
    ae_strides: tuple[int, ...] = positive((2, 4, 4, 2))
    latent_channels: int = positive(16)
    ae_segment: int = positive(8192)  # training crop, samples
    ae_wave_weight: float = 1.0
    ae_kl_weight: float = 1.0e-3

    def __post_init__(self) -> None:
        from domains.audio.augment import augmentation_names

        augmentation_names(self.augment, "model.augment")  # unknown names: a ValueError naming the field


# --- data ------------------------------------------------------------------------------------------------------------


def _clip_length(data: AudioData) -> int:
    """Samples per clip; validates rate and length."""
    if data.sample_rate <= 0 or data.seconds <= 0:
        raise ValueError(f"data.sample_rate and data.seconds must be positive, got {data.sample_rate}, {data.seconds}")
    return int(round(data.seconds * data.sample_rate))


def _need_root(data: AudioData) -> Path:
    """data.root as a Path, or a clear error for sources that need one."""
    if not data.root:
        raise ValueError(f"data.root is required for data.source={data.source!r} (e.g. data.root=/path/to/{data.source})")
    return Path(data.root).expanduser()


def _class_names(data: AudioData) -> list[str]:
    """The label names of a data config: ``data.class_names``, else from the data (``AudioDomain.resolve`` writes
    them into the run config so that they travel with the checkpoint); ``data`` is not changed."""
    if data.class_names:
        return list(data.class_names)
    if data.source == "folder":
        root = _need_root(data)
        if not root.is_dir():
            raise FileNotFoundError(f"audio directory not found: {root} (data.root of data.source=folder)")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"{root}: no label sub-folders (data.source=folder expects one sub-folder per label)")
    else:
        from domains.audio.synth import DIGIT_WORDS

        names = list(DIGIT_WORDS)
    return list(names)


@functools.lru_cache(maxsize=8)
def _load_clips_cached(key: str) -> Any:
    """Load (and memoise per process) the clips of one JSON-encoded (data config, split)."""
    from domains.audio import data as adata

    d = json.loads(key)
    src, sr, sec, split = d["source"], d["sample_rate"], d["seconds"], d["split"]
    if src == "digits":
        clips = adata.load_digits(d["cache_dir"], split=_SPLITS["digits"][split], sample_rate=sr, seconds=sec,
                                  num_voices=d["num_voices"], progress=False)
    elif src == "fsdd":
        clips = adata.load_fsdd(d["root"], split=_SPLITS["fsdd"][split], sample_rate=sr, seconds=sec, cache=True)
    elif src == "speechcommands":
        clips = adata.load_speechcommands(d["root"], split=_SPLITS["speechcommands"][split], sample_rate=sr, seconds=sec,
                                          cache=True)
    else:
        clips = adata.load_folder(d["root"], sample_rate=sr, seconds=sec, cache=True)
    if d["max_clips"] is not None and len(clips) > d["max_clips"]:
        perm = torch.randperm(len(clips), generator=torch.Generator().manual_seed(d["seed"]))
        clips = clips.subset(perm[: d["max_clips"]].sort().values)
    return clips


def load_clips(data: AudioData, split: str = "train") -> Any:
    """The `AudioClips` of a split ('train', 'valid'/'validation', 'test'); 'folder' has one split for all."""
    if data.source != "folder" and split not in _SPLITS[data.source]:
        raise ValueError(f"split must be one of {sorted(_SPLITS[data.source])}, got {split!r}")
    if data.source != "digits":
        _need_root(data)
    if data.max_clips is not None and data.max_clips < 1:
        raise ValueError(f"data.max_clips must be >= 1 or null, got {data.max_clips}")
    _clip_length(data)
    key = json.dumps({"source": data.source, "root": data.root, "sample_rate": data.sample_rate, "seconds": data.seconds,
                      "split": split, "cache_dir": data.cache_dir, "num_voices": data.num_voices,
                      "max_clips": data.max_clips, "seed": data.seed}, sort_keys=True)
    # file sources: the prepared-data cache on disk is the memo (it re-reads only files that changed since)
    clips = _load_clips_cached(key) if data.source == "digits" else _load_clips_cached.__wrapped__(key)
    names = _class_names(data)
    if list(clips.class_names) != names:
        raise ValueError(f"the data's classes {clips.class_names} differ from data.class_names {names}")
    return clips


def _with_extra_sources(data: AudioData, clips: Any) -> Any:
    """`clips` (data.source's train split) followed by the train split of every ``data.extra_sources`` entry."""
    from dataclasses import replace

    from domains.audio.data import concat_clips

    parts = [clips]
    for source, root in data.extra_sources.items():
        if source not in ("digits", "fsdd", "speechcommands", "folder"):
            raise ValueError(f"data.extra_sources: unknown source {source!r} (digits, fsdd, speechcommands, folder)")
        extra = replace(data, source=source, root=root, extra_sources={}, class_names=list(_class_names(data)))
        try:
            parts.append(load_clips(extra, "train"))
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"data.extra_sources.{source}={root!r}: {err}") from err
    return concat_clips(parts)


def _clip_headers(data: AudioData, split: str, synced: Any) -> Any:
    """Labels, groups and sources of a file source's split from its synced prepared-data cache (no audio is read)."""
    from domains.audio import data as adata

    root, sr, sec = _need_root(data), data.sample_rate, data.seconds
    if data.source == "fsdd":
        return adata.load_fsdd(root, _SPLITS["fsdd"][split], sr, sec, cache=synced, headers_only=True)
    if data.source == "speechcommands":
        return adata.load_speechcommands(root, _SPLITS["speechcommands"][split], sr, sec, cache=synced,
                                         headers_only=True)
    return adata.load_folder(root, sr, sec, cache=synced, headers_only=True)


COUNTS_FILE = "counts.json"


def _counts_memo(data: AudioData, synced: Any) -> dict[str, Any]:
    """The split counts ``multidiff data`` stored for this cache, and the key they must match: the data version, the
    source and class names, and for Speech Commands the stat of its split lists (which are not audio files)."""
    parts: list[Any] = [synced.version, data.source, data.class_names]
    if data.source == "speechcommands":
        root = _need_root(data)
        for name in ("validation_list.txt", "testing_list.txt"):
            st = (root / name).stat() if (root / name).is_file() else None
            parts.append(None if st is None else [st.st_size, st.st_mtime_ns])
    if data.source == "folder":  # label folders with no usable clip still count as classes
        root = _need_root(data)
        parts.append(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    want = json.dumps(parts, sort_keys=True)
    try:
        stored = json.loads((synced.cache.directory / COUNTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = {}
    return {**(stored if isinstance(stored, dict) else {}), "want": want}


def _store_counts(synced: Any, key: str, counts: dict[str, Any]) -> None:
    """Keep the split counts of this data version beside the cache (atomically; a failure only costs a recount)."""
    from multidiff.files import atomic_write

    try:
        atomic_write(synced.cache.directory / COUNTS_FILE, json.dumps({"key": key, "counts": counts}), durable=False)
    except OSError:
        pass


def _sync_source(data: AudioData) -> Any:
    """Sync the prepared-data cache of a file source (fsdd, speechcommands, folder) with its folder."""
    import warnings

    from domains.audio import data as adata

    with warnings.catch_warnings():  # the loads below warn about skipped files once
        warnings.simplefilter("ignore", adata.AudioDataWarning)
        root = _need_root(data)
        if data.source == "fsdd":
            return adata.load_fsdd(root, sample_rate=data.sample_rate, seconds=data.seconds, cache=True,
                                   sync_only=True)
        if data.source == "speechcommands":
            return adata.load_speechcommands(root, sample_rate=data.sample_rate, seconds=data.seconds, cache=True,
                                             sync_only=True)
        return adata.load_folder(root, sample_rate=data.sample_rate, seconds=data.seconds, cache=True, sync_only=True)


# --- input clip and mask span -----------------------------------------------------------------------------------------


class InputClip(NamedTuple):
    """An ``--inpaint`` file fitted to the model's clip: ``audio`` [length] float32, whether its samples are exactly
    16-bit PCM values (a PCM_16 write keeps them bit-exact), and the file's own length in seconds and in samples
    at the model's rate (before cropping / padding)."""

    audio: Tensor
    exact16: bool
    seconds: float
    samples: int


def _secs(x: float) -> str:
    """Seconds for messages: 30, 0.8, 0.812."""
    return f"{x:.3f}".rstrip("0").rstrip(".") or "0"


def read_clip(path: Path | str, sample_rate: int, length: int) -> InputClip:
    """A WAV/FLAC file as mono float32 ``[length]`` at `sample_rate` (resampled, mono-mixed, end-padded or cropped).

    Read and checked by `domains.audio.data.decode_audio`, the datasets' reader: unreadable, empty and NaN/inf
    files raise ValueError naming the file. A float file over full scale is scaled down to peak 1.0 like in the
    datasets. Time 0 stays time 0, so ``--mask`` seconds refer to the file's own timeline: a longer file is cut
    to its first ``length`` samples, a shorter one is padded with silence at the end; both with an
    `AudioDataWarning` saying so.
    """
    from domains.audio.data import AudioDataWarning, AudioReadError, decode_audio, fit_full_scale

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inpaint {path}: file not found")
    try:
        decoded = decode_audio(path)
    except AudioReadError as err:
        raise ValueError(f"--inpaint {path}: {err.detail}") from err
    samples, note = fit_full_scale(decoded.samples)
    if note is not None:
        warnings.warn(f"--inpaint {path}: {note}", AudioDataWarning, stacklevel=2)
    sr = decoded.sample_rate
    exact16 = decoded.subtype == "PCM_16" and decoded.channels == 1 and sr == sample_rate and note is None
    mono = torch.from_numpy(samples)
    if sr != sample_rate:
        import torchaudio

        mono = torchaudio.functional.resample(mono, sr, sample_rate).clamp_(-1.0, 1.0)  # sinc overshoot only
    n = mono.shape[0]
    model_s, file_s = length / sample_rate, decoded.seconds
    if n > length:
        warnings.warn(f"--inpaint {path} is {_secs(file_s)} s; the model's clip is {_secs(model_s)} s: using the first "
                      f"{_secs(model_s)} s", AudioDataWarning, stacklevel=2)
    elif n < length:
        warnings.warn(f"--inpaint {path} is {_secs(file_s)} s; the model's clip is {_secs(model_s)} s: padded with "
                      f"silence from {_secs(n / sample_rate)} s to {_secs(model_s)} s", AudioDataWarning, stacklevel=2)
    out = torch.zeros(length, dtype=torch.float32)
    out[: min(n, length)] = mono[:length]
    return InputClip(out, exact16, file_s, n)


def parse_span(mask: str, seconds: float, sample_rate: int, clip: InputClip | None = None,
               file: Path | str | None = None) -> tuple[int, int]:
    """``"0.3:0.5"`` (seconds) -> the sample span [start, end) to regenerate; errors say what is wrong.

    With the input `clip` (and its `file` name), a span that starts where the file has already ended (it would
    regenerate padding only) is refused, naming the file's real length.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*", mask)
    if m is None:
        raise ValueError(f"--mask {mask!r}: expected START:END in seconds, e.g. 0.3:0.5")
    start, end = float(m[1]), float(m[2])
    if not start < end:
        raise ValueError(f"--mask {mask!r}: start {start:g} s must be before end {end:g} s")
    if end > seconds + 1e-9:
        longer = (f"; {file} is {_secs(clip.seconds)} s long and only its first {seconds:g} s are used"
                  if clip is not None and clip.samples > round(seconds * sample_rate) else "")
        raise ValueError(f"--mask {mask!r}: the span ends after the clip (clips are {seconds:g} s long){longer}")
    a, b = int(round(start * sample_rate)), min(int(round(end * sample_rate)), int(round(seconds * sample_rate)))
    if b <= a:
        raise ValueError(f"--mask {mask!r}: the span is shorter than one sample at {sample_rate} Hz")
    if clip is not None and a >= clip.samples:
        raise ValueError(f"--mask {mask!r}: the span lies entirely in the silence padded after the end of {file}, "
                         f"which is {_secs(clip.seconds)} s long (the model's clip is {seconds:g} s); choose a span "
                         f"that starts before {_secs(clip.samples / sample_rate)} s")
    return a, b


# --- the digit classifier as a Trainer module -------------------------------------------------------------------------


def _build_classifier(cfg: Any) -> nn.Module:
    from domains.audio.classifier import DigitClassifier

    m = cfg.model
    return DigitClassifier(num_classes=len(_class_names(cfg.data)), sample_rate=cfg.data.sample_rate, n_mels=m.n_mels,
                           channels=tuple(m.classifier_channels), embed_dim=m.embed_dim, dropout=m.classifier_dropout)


def _codec(cfg: Any) -> Any:
    """The `LatentCodec` of a latent-diffusion config (None for waveform models); one object per autoencoder
    version and statistics, so requests of one model share it."""
    if not cfg.data.latent:
        return None
    from domains.audio.latent import file_stamp, find_autoencoder

    return _codec_cached(cfg.data.latent, json.dumps(cfg.data.latent_stats, sort_keys=True), cfg.data.sample_rate,
                         _clip_length(cfg.data), file_stamp(find_autoencoder(cfg.data.latent)))


@functools.lru_cache(maxsize=4)
def _codec_cached(latent: str, stats: str, sample_rate: int, length: int, stamp: int) -> Any:
    from domains.audio.latent import LatentCodec

    data = AudioData(latent=latent, latent_stats=json.loads(stats), sample_rate=sample_rate)
    return LatentCodec.of(data, sample_rate, length)


def _codec_of_request(request: SampleRequest) -> Any:
    return request.meta.get("codec")


class ClassifierLoss(nn.Module):
    """``forward(batch)`` = cross-entropy of the digit classifier (the SC09 judge, Donahue et al. 2019) on a batch,
    with the waveform and spectrogram augmentations of `domains.audio.augment` in training mode (global RNG, so a
    resumed run continues its stream)."""

    def __init__(self, classifier: nn.Module, augment: bool | tuple[str, ...] = True, label_smoothing: float = 0.0,
                 length: int | None = None) -> None:
        from domains.audio.augment import augmentation_names

        super().__init__()
        self.classifier = classifier
        self.augment = augmentation_names(augment, "model.augment")
        self.label_smoothing = label_smoothing
        self.length = length  # expected clip length in samples (data.seconds x data.sample_rate), when known

    def forward(self, batch: Any) -> Tensor:
        from domains.audio.augment import augment_waveforms
        from domains.audio.classifier import augment_spectrogram

        audio, labels = batch
        clf = self.classifier
        if self.length is not None and audio.shape[-1] != self.length:
            raise ValueError(f"classifier training got clips of {audio.shape[-1]} samples, expected {self.length} "
                             f"(data.seconds x data.sample_rate)")
        clf.check_length(audio)
        with torch.no_grad():
            audio = audio.float()
            if self.training and self.augment:
                audio = augment_waveforms(audio.cpu(), clf.sample_rate, self.augment,
                                          torch.default_generator).to(audio.device)
            spec = clf.spectrogram(audio)
            if self.training and "spectrogram" in self.augment:
                spec = augment_spectrogram(spec.cpu(), torch.default_generator).to(spec.device)
        logits = clf.head(clf.embed_spectrogram(spec))
        return F.cross_entropy(logits, labels.long(), label_smoothing=self.label_smoothing)


def load_any_classifier(path: Path | str, device: str = "cpu") -> nn.Module:
    """A DigitClassifier from a `save_classifier` file or from a `multidiff train audio --config classifier` run/checkpoint."""
    from safetensors import safe_open

    from domains.audio.classifier import FORMAT, load_classifier

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        if fmt == FORMAT:
            return load_classifier(path, device)
    return _classifier_from_run(path).to(device).eval()


def _classifier_from_run(path: Path, prefer_ema: bool = True) -> nn.Module:
    """Rebuild the classifier of a multidiff training checkpoint (EMA weights unless ``prefer_ema=False``)."""
    from multidiff.checkpoint import load_checkpoint_for_sampling
    from multidiff.registry import read_run

    ckpt = load_checkpoint_for_sampling(path)
    raw = ckpt.config
    if raw.get("domain") != "audio" or (raw.get("model") or {}).get("kind") != "classifier":
        raise ValueError(f"{ckpt.path}: not a digit classifier (expected a classifier file or a run of "
                         f"`multidiff train audio --config classifier`)")
    run = read_run(ckpt, AudioDomain())
    model = run.load_into(_build_classifier(run.cfg), "classifier.", prefer_ema=prefer_ema, what="classifier")
    model.meta = {"source": str(ckpt.path), "step": ckpt.step, "class_names": _class_names(run.cfg.data)}
    return model.eval()


def export_classifier(run: Path | str, out: Path | str, meta: dict[str, Any] | None = None,
                      prefer_ema: bool = True) -> Path:
    """Write the (EMA) classifier of a training run as a standalone `save_classifier` safetensors file."""
    from domains.audio.classifier import save_classifier

    model = _classifier_from_run(Path(run), prefer_ema)
    return save_classifier(model, out, meta)


# --- the domain ------------------------------------------------------------------------------------------------------


AudioConfig = RunConfig[AudioData, AudioModel]


class AudioDomain(Domain[AudioData, AudioModel]):
    """Class-conditional raw-waveform diffusion with a 1D U-Net (DiffWave, Kong et al. 2021; CFG, Ho & Salimans 2022)."""

    name = "audio"
    description = "class-conditional raw-waveform diffusion (spoken digits; FSDD, SC09, folders of WAVs)"
    DataConfig = AudioData
    ModelConfig = AudioModel
    output_patterns = ("sample_*.wav", GRID_FILE, LABELS_FILE)
    default_recipe = "digits"
    # multidiff sample --precision auto: the U-Net samples 1.57x faster (CPU time) under bf16 autocast at equal
    # quality (160 clips: cond. acc. 0.838 vs 0.844, FID 372 vs 371; bench/inference_precision.py, README)
    sample_precision = "bf16"

    # --- data and model ---------------------------------------------------------------------------
    def resolve(self, cfg: AudioConfig) -> AudioConfig:
        """``cfg`` with ``data.class_names`` filled from the data when null (a folder's sorted sub-folder names, the
        digit words otherwise), so that label k means the same class wherever the checkpoint goes. Pure."""
        data = cfg.data
        if not data.class_names:
            data = dataclasses.replace(data, class_names=_class_names(data))
        if data.latent and not data.latent_stats:  # latent diffusion: the autoencoder's identity + latent statistics
            from domains.audio.latent import compute_stats, load_autoencoder

            ae = load_autoencoder(data.latent)
            if ae.sample_rate != data.sample_rate:
                raise ValueError(f"{ae.source}: the autoencoder works at {ae.sample_rate} Hz, data.sample_rate is "
                                 f"{data.sample_rate} Hz")
            ae.check_length(_clip_length(data), f"clips ({data.seconds} s x {data.sample_rate} Hz)")
            data = dataclasses.replace(data, latent_stats=compute_stats(ae, load_clips(data, "train").audio))
        return cfg if data is cfg.data else dataclasses.replace(cfg, data=data)

    def build_dataset(self, cfg: AudioConfig, split: str = "train") -> Dataset:
        from domains.audio.data import ClipDataset

        clips = load_clips(cfg.data, split)
        if split == "train" and cfg.data.extra_sources:
            clips = _with_extra_sources(cfg.data, clips)
        codec = _codec(cfg)
        if codec is not None:
            from domains.audio.latent import LatentDataset

            silence = codec.encode(torch.zeros(1, 1, _clip_length(cfg.data)))[0].median(dim=-1, keepdim=True).values
            shift = cfg.data.max_shift // codec.compression if split == "train" else 0
            dataset: Dataset = LatentDataset(codec.encode(clips.audio), clips.labels, shift, silence)
        else:
            dataset = ClipDataset(clips, max_shift=cfg.data.max_shift if split == "train" else 0)
        dataset.data_version = clips.version  # type: ignore[attr-defined]  # recorded in the run log by the trainer
        return dataset

    def build_backbone(self, cfg: AudioConfig) -> nn.Module:
        from domains.audio.unet import UNet1D

        m = cfg.model
        if m.kind == "autoencoder":
            raise ValueError("model.kind='autoencoder': this recipe trains the waveform autoencoder, which has no "
                             "denoiser to sample; use it for latent diffusion via data.latent=RUN_OR_FILE")
        if m.kind != "denoiser":
            raise ValueError(f"model.kind={m.kind!r}: this recipe trains the digit classifier, which has no denoiser to "
                             f"sample; use it for metrics via data.classifier=RUN_DIR")
        codec = _codec(cfg)
        net = UNet1D(in_channels=1 if codec is None else codec.channels, channels=m.channels,
                     multipliers=tuple(m.multipliers), factors=tuple(m.factors),
                     blocks=tuple(m.blocks), attention_levels=m.attention_levels, heads=m.heads,
                     num_classes=len(_class_names(cfg.data)), patch=m.patch, dropout=m.dropout,
                     kernel_size=m.kernel_size, patch_overlap=m.patch_overlap,
                     full_rate_channels=m.full_rate_channels)
        length = _clip_length(cfg.data)
        if codec is not None:
            if length // codec.compression % net.total_factor:
                raise ValueError(f"the latent of a clip has {length // codec.compression} frames ({length} samples / "
                                 f"compression {codec.compression}), not divisible by the U-Net's down-sampling "
                                 f"factor {net.total_factor} (model.patch x model.factors); change the model")
        elif length % net.total_factor:
            raise ValueError(f"clip length {length} samples ({cfg.data.seconds} s x {cfg.data.sample_rate} Hz) is not "
                             f"divisible by the U-Net's down-sampling factor {net.total_factor} (model.patch x "
                             f"model.factors); change data.seconds or the model")
        return net

    def training_module(self, cfg: AudioConfig) -> nn.Module | None:
        """The digit-classifier cross-entropy for model.kind=classifier, the autoencoder's MR-STFT + L1 + KL loss for
        model.kind=autoencoder; None trains the denoiser."""
        if cfg.model.kind == "autoencoder":
            from domains.audio.autoencoder import AutoencoderLoss, build_autoencoder

            m = cfg.model
            ae = build_autoencoder(cfg)
            ae.check_length(_clip_length(cfg.data), f"clips ({cfg.data.seconds} s x {cfg.data.sample_rate} Hz)")
            return AutoencoderLoss(ae, m.ae_segment, m.ae_wave_weight, m.ae_kl_weight)
        if cfg.model.kind != "classifier":
            return None
        return ClassifierLoss(_build_classifier(cfg), cfg.model.augment, cfg.model.label_smoothing,
                              length=_clip_length(cfg.data))

    def unpack(self, batch: Any) -> tuple[Tensor, dict[str, Tensor] | None, dict[str, Any]]:
        x, label = batch
        return x, {"label": label}, {}

    def space(self, batch: Any) -> Space:
        return Euclidean()

    def prepare_data(self, cfg: AudioConfig) -> dict[str, Any]:
        """Build / load the configured source; clip counts per split and class."""
        d = cfg.data
        splits = ["all"] if d.source == "folder" else (["train", "validation", "test"] if d.source == "speechcommands"
                                                       else ["train", "test"])
        summary: dict[str, Any] = {"source": d.source, "sample_rate": d.sample_rate, "seconds": d.seconds}
        if d.source == "digits":
            from domains.audio.synth import default_cache_dir

            summary["cache_dir"] = str(Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir())
        else:
            summary["root"] = d.root
            synced = _sync_source(d)  # change data capture: only added / changed files are processed
            summary["changes"] = synced.changes
            memo = _counts_memo(d, synced)
            if memo.get("key") == memo["want"]:  # same content, same split rules: the counts are the ones stored
                return {**summary, **memo["counts"]}
        counts_by_split: dict[str, Any] = {}
        for split in splits:
            clips = load_clips(d, "train" if split == "all" else split) if d.source == "digits" else \
                _clip_headers(d, "train" if split == "all" else split, synced)
            counts = torch.bincount(clips.labels, minlength=len(clips.class_names)).tolist()
            counts_by_split[split] = {"clips": len(clips), "groups": len(set(clips.groups)),
                                      "per_class": dict(zip(clips.class_names, counts))}
        if d.source != "digits":
            _store_counts(synced, memo["want"], counts_by_split)
        return {**summary, **counts_by_split}

    # --- sampling --------------------------------------------------------------------------------
    def _label(self, value: str, names: list[str]) -> int:
        lowered = [n.lower() for n in names]
        if value.strip().lower() in lowered:
            return lowered.index(value.strip().lower())
        try:
            idx = int(value)
        except ValueError:
            idx = -1
        if 0 <= idx < len(names):
            return idx
        valid = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise ValueError(f"audio: unknown label {value!r}; valid labels (index or name): {valid}")

    def request(self, cfg: AudioConfig, num: int, conditions: dict[str, str], inpaint: Path | None = None,
                mask: str | None = None, seed: int = 0) -> SampleRequest:
        unknown = set(conditions) - {"label"}
        if unknown:
            raise ValueError(f"audio: unknown condition(s) {sorted(unknown)}; the audio domain takes label=INDEX|NAME")
        if num < 1:
            raise ValueError(f"audio: --num must be >= 1, got {num}")
        names = _class_names(cfg.data)
        sr, length = cfg.data.sample_rate, _clip_length(cfg.data)
        if "label" in conditions:
            labels = torch.full((num,), self._label(conditions["label"], names), dtype=torch.long)
        else:  # cycle through the classes so an unlabelled request still covers all of them
            labels = (torch.arange(num) + seed) % len(names)  # chunk at sample s gets seed + s: one cycle overall
        meta: dict[str, Any] = {"labels": labels, "class_names": names, "sample_rate": sr,
                                "wav_format": "float" if cfg.data.wav_format == "float" else "pcm16",
                                "data": _data_record(cfg.data)}
        codec = _codec(cfg)
        if codec is not None:
            meta["codec"] = codec
        known = keep = None
        if inpaint is not None or mask is not None:
            if inpaint is None:
                raise ValueError(f"--mask {mask!r} needs --inpaint FILE.wav (the clip whose other parts are kept)")
            if mask is None:
                raise ValueError(f"--inpaint {inpaint}: needs --mask START:END (seconds to regenerate, e.g. 0.3:0.5)")
            clip = read_clip(inpaint, sr, length)
            a, b = parse_span(mask, length / sr, sr, clip, inpaint)
            keep = torch.ones(1, 1, length, dtype=torch.bool)
            keep[..., a:b] = False
            known = clip.audio.view(1, 1, length).expand(num, 1, length).contiguous()
            keep = keep.expand(num, 1, length).contiguous()
            if cfg.data.wav_format == "auto" and not clip.exact16:
                meta["wav_format"] = "float"  # keep the kept part bit-exact in the written file
            meta["inpaint"] = {"file": str(Path(inpaint).resolve()), "start_s": a / sr, "end_s": b / sr,
                               "start": a, "end": b}
            meta["known"], meta["keep"] = known, keep
            if codec is not None:  # inpaint in latent space: keep the frames whose samples all lie outside the span
                c = codec.compression
                known = codec.encode(clip.audio.view(1, 1, length)).expand(num, -1, -1).contiguous()
                frames = torch.arange(length // c)
                keep = ((frames + 1) * c <= a) | (frames * c >= b)
                keep = keep.view(1, 1, -1).expand(num, codec.channels, -1).contiguous()
        like = torch.zeros(num, 1, length) if codec is None else torch.zeros(num, codec.channels, length // codec.compression)
        return SampleRequest(like=like, space=Euclidean(), cond={"label": labels}, known=known, mask=keep, meta=meta)

    def decode(self, x: Tensor, request: SampleRequest) -> dict[str, Any]:
        codec = _codec_of_request(request)
        audio = x.detach().float().cpu().clamp(-1.0, 1.0) if codec is None else codec.decode(x)
        known, keep = request.meta.get("known"), request.meta.get("keep")
        if known is not None and keep is not None:  # kept samples are the input's, bit for bit (clamping included)
            audio = torch.where(keep.cpu(), known.cpu().float(), audio)
        return {"audio": audio, **{k: v for k, v in request.meta.items() if k not in ("known", "keep", "codec")}}

    def merge(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {**parts[0], "audio": torch.cat([p["audio"] for p in parts]),
                "labels": torch.cat([p["labels"] for p in parts])}

    def write(self, samples: dict[str, Any], out_dir: Path, *, figures: bool = True) -> list[Path]:
        from domains.audio.features import spectrogram_grid_png

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        audio, labels, names, sr = samples["audio"], samples["labels"], samples["class_names"], samples["sample_rate"]
        files: list[Path] = []
        rows = []
        for i, (wave, lab) in enumerate(zip(audio, labels.tolist())):
            path = out_dir / f"sample_{i:03d}_label{lab}.wav"
            _write_wav(path, wave[0], sr, samples.get("wav_format", "pcm16"))
            files.append(path)
            rows.append({"file": path.name, "label": lab, "name": names[lab]})
        pictures = []
        if figures:
            titles = [f"#{i} {names[r['label']]}" for i, r in enumerate(rows)]
            pictures.append(Path(spectrogram_grid_png(audio, sr, out_dir / GRID_FILE, titles=titles)))
        meta = {"sample_rate": sr, "class_names": names, "samples": rows}
        if "data" in samples:
            meta["data"] = samples["data"]  # the model's data: `evaluate` scores against the same reference set
        if "inpaint" in samples:
            meta["inpaint"] = samples["inpaint"]
        labels_path = out_dir / LABELS_FILE
        labels_path.write_text(json.dumps(meta, indent=2) + "\n")
        return [*files, *pictures, labels_path]

    def read(self, path: Path) -> dict[str, Any]:
        """Read WAVs written by ``write`` (a directory, or one WAV) with their labels when labels.json is there.

        Every file goes through `decode_audio` (unreadable, empty or NaN/inf files raise ValueError naming them);
        amplitudes are kept as stored."""
        from domains.audio.data import AudioReadError, decode_audio

        path = Path(path)
        if path.is_file():
            files, meta = [path], {}
        else:
            meta_path = path / LABELS_FILE
            meta = {}
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise ValueError(f"{meta_path}: not the JSON written by `multidiff sample audio` ({err})") from err
                if not isinstance(meta, dict):
                    raise ValueError(f"{meta_path}: expected a JSON object (written by `multidiff sample audio`)")
            if meta.get("samples"):
                files = [path / r["file"] for r in meta["samples"]]
            else:
                files = sorted(path.glob("*.wav"))
        if not files:
            raise FileNotFoundError(f"{path}: no WAV files (expected sample_*.wav written by `multidiff sample audio`)")
        waves, rate = [], None
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {path / LABELS_FILE} but missing")
            try:
                decoded = decode_audio(f)
            except AudioReadError as err:
                raise ValueError(f"{f}: {err.detail}") from err
            sr = decoded.sample_rate
            if rate is not None and sr != rate:
                raise ValueError(f"{f}: sample rate {sr} Hz differs from {rate} Hz of the other files")
            rate = sr
            waves.append(torch.from_numpy(decoded.samples))
        length = max(w.shape[0] for w in waves)
        audio = torch.zeros(len(waves), 1, length)
        for i, w in enumerate(waves):
            audio[i, 0, : w.shape[0]] = w
        labels = None
        if meta.get("samples"):
            labels = torch.tensor([int(r["label"]) for r in meta["samples"]])
        else:
            found = [_SAMPLE_NAME.match(f.name) for f in files]
            if all(m is not None and m[2] is not None for m in found):
                labels = torch.tensor([int(m[2]) for m in found])  # type: ignore[index]
        return {"audio": audio, "labels": labels, "sample_rate": rate, "files": files, "meta": meta,
                "lengths": [w.shape[0] for w in waves]}

    def evaluate(self, path: Path, cfg: AudioConfig | None = None) -> dict[str, Any]:
        """Basic stats always; SC09-protocol metrics (IS, FID, cond. accuracy...) when a classifier that knows the
        samples' classes is available. Undefined metrics are None (JSON null), never NaN.

        Samples written by `multidiff sample` record their model's data settings and class names in labels.json:
        those decide the reference set and the classes, so `sample` and `evaluate` score the same files the same
        way whatever recipe `evaluate` is given; ``data.classifier`` (when set) still picks the judge. WAVs without
        that record are taken to be from ``cfg.data``.
        """
        s = self.read(path)
        audio, sr = s["audio"], s["sample_rate"]
        rms = audio.pow(2).mean(dim=(1, 2)).sqrt()
        out: dict[str, Any] = {
            "count": float(audio.shape[0]),
            "sample_rate": float(sr),
            "duration_s": float(np.mean(s["lengths"]) / sr),
            "rms": float(rms.mean()),
            "peak": float(audio.abs().max()),
            "silent_share": float((rms < 1e-3).float().mean()),
        }
        if audio.shape[-1] >= 2 * round(0.05 * sr):  # quietest vs loudest 50 ms frame, median over clips
            from domains.audio.metrics import noise_floor_db

            out["noise_floor_db"] = float(np.median(noise_floor_db(audio, sr)))
        info = s["meta"].get("inpaint")
        if info and Path(info["file"]).is_file():
            out.update(_inpaint_metrics(audio, sr, info))
        data = _samples_data(s["meta"], cfg.data if cfg is not None else AudioData())
        out.update(_classifier_metrics(audio, sr, s["labels"], s["meta"].get("class_names"), data))
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


class AudioMetricsWarning(UserWarning):
    """Audio metrics were left out (e.g. the classifier does not know the samples' classes)."""


_DATA_PATHS = ("root", "cache_dir", "classifier")


def _data_record(data: AudioData) -> dict[str, Any]:
    """The data settings of a model as written to labels.json, with absolute paths (evaluate may run elsewhere)."""
    from dataclasses import asdict

    record = asdict(data)
    for key in _DATA_PATHS:
        if record.get(key):
            record[key] = str(Path(record[key]).expanduser().resolve())
    record["class_names"] = _class_names(data)
    return record


def _samples_data(meta: dict[str, Any], data: AudioData) -> AudioData:
    """The data settings to score samples with: the ones recorded by `multidiff sample` in labels.json when there
    (``data.classifier`` of `data` still wins when set), else `data`."""
    from dataclasses import fields

    recorded = meta.get("data")
    if not isinstance(recorded, dict):
        return data
    known = {f.name for f in fields(AudioData)}
    out = AudioData(**{k: v for k, v in recorded.items() if k in known})
    if data.classifier:
        out.classifier = data.classifier
    return out


def _name_key(name: str) -> str:
    """A class name compared case-insensitively, a digit '0'..'9' as its word ('7' ~ 'seven')."""
    from domains.audio.synth import DIGIT_WORDS

    key = str(name).strip().lower()
    return DIGIT_WORDS[int(key)] if len(key) == 1 and key.isdigit() else key


def classifier_class_names(clf: nn.Module) -> list[str] | None:
    """The class names of a metrics classifier: recorded in its metadata (runs of ``--config classifier``, files
    written since names were recorded), else the ten digit words for a 10-class digit classifier file (the shipped
    one is trained on the spoken digits), else None (unknown)."""
    from domains.audio.synth import DIGIT_WORDS

    names = (getattr(clf, "meta", None) or {}).get("class_names")
    if names:
        return [str(n) for n in names]
    return list(DIGIT_WORDS) if getattr(clf, "num_classes", None) == len(DIGIT_WORDS) else None


def match_classes(model_names: list[str], judge_names: list[str] | None) -> tuple[Tensor | None, list[str]]:
    """Map model class indices to the judge's by name: ``(index map [len(model_names)], unmatched model names)``;
    the map is None when any name is unmatched."""
    if judge_names is None:
        return None, list(model_names)
    index = {_name_key(n): i for i, n in enumerate(judge_names)}
    missing = [n for n in model_names if _name_key(n) not in index]
    if missing:
        return None, missing
    return torch.tensor([index[_name_key(n)] for n in model_names], dtype=torch.long), []


CLASSIFIER_METRICS = ("is", "mis", "fid", "am", "ndb_k", "ndb", "cond_acc", "n")


def _classifier_metrics(audio: Tensor, sr: int, labels: Tensor | None, class_names: list[str] | None,
                        data: AudioData) -> dict[str, Any]:
    """The classifier-based scores (`CLASSIFIER_METRICS`), or ``classifier_metrics: "unavailable: WHY"`` (with an
    `AudioMetricsWarning`) when no classifier is there or it does not know the samples' classes by name."""
    ckpt = Path(data.classifier).expanduser() if data.classifier else DEFAULT_CLASSIFIER
    if not ckpt.exists():
        return {"classifier_metrics": f"unavailable: no digit classifier at {ckpt} (set data.classifier in a --config "
                                      f"YAML, or ship that file)"}
    from domains.audio.metrics import evaluate_audio

    clf = load_any_classifier(ckpt)
    if class_names is None and labels is not None:
        try:
            class_names = _class_names(data)
        except (ValueError, FileNotFoundError):
            class_names = None
    judge_names = classifier_class_names(clf)
    if class_names is not None:
        mapping, missing = match_classes(list(class_names), judge_names)
        if mapping is None:
            knows = f"its classes are {judge_names}" if judge_names is not None else "it records no class names"
            why = (f"the classifier {ckpt} does not know the samples' classes {missing} ({knows}), so "
                   f"{', '.join(CLASSIFIER_METRICS[:-1])} are left out; score them with a classifier trained on "
                   f"these classes: data.classifier=RUN (`multidiff train audio --config classifier "
                   f"data.source=... data.root=...`)")
            warnings.warn(f"audio metrics: {why}", AudioMetricsWarning, stacklevel=3)
            return {"classifier_metrics": f"unavailable: {why}"}
        if labels is not None:
            if int(labels.max()) >= len(class_names) or int(labels.min()) < 0:
                return {"classifier_metrics": f"unavailable: labels exceed the samples' {len(class_names)} classes"}
            labels = mapping[labels.long()]
    elif labels is not None and int(labels.max()) >= clf.num_classes:
        return {"classifier_metrics": f"unavailable: labels exceed the classifier's {clf.num_classes} classes"}
    out: dict[str, Any] = {}
    reference = None
    if audio.shape[0] >= 2:
        split = "test" if data.source != "folder" else "train"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = load_clips(data, split)
            where = data.root if data.source != "digits" else (data.cache_dir or "default cache")
            out["reference"] = f"{data.source} {where}, {split} split, {len(reference)} clips"
        except Exception as err:  # the reference set is optional: no FID then
            out["reference"] = f"unavailable ({type(err).__name__}: {err})"
    metrics = evaluate_audio(audio, clf, reference=reference, labels=labels, sample_rate=sr,
                             ndb_bins=min(50, max(2, audio.shape[0] // 4)))
    out.update({k: None if v is None else float(v) for k, v in metrics.items()})
    out["classifier"] = str(ckpt)
    return out


def _write_wav(path: Path, wave: Tensor, sample_rate: int, fmt: str) -> None:
    """One mono WAV; pcm16 is quantised as round(x * 32768), which reproduces 16-bit input samples exactly."""
    x = wave.detach().cpu().numpy().astype(np.float32)
    if fmt == "float":
        sf.write(str(path), x, sample_rate, subtype="FLOAT")
    else:
        pcm = np.clip(np.round(x.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
        sf.write(str(path), pcm, sample_rate, subtype="PCM_16")


def _inpaint_metrics(audio: Tensor, sample_rate: int, info: dict[str, Any]) -> dict[str, float | None]:
    """How the regenerated span relates to the original clip: SNR / MR-STFT there, max error outside it."""
    from domains.audio.metrics import multi_resolution_stft_distance, snr_db

    with warnings.catch_warnings():  # the crop / padding was reported when the samples were made
        warnings.simplefilter("ignore")
        original = read_clip(info["file"], sample_rate, audio.shape[-1]).audio
    target = original.view(1, 1, -1).expand_as(audio)
    span = torch.zeros(audio.shape[-1], dtype=torch.bool)
    span[info["start"]: info["end"]] = True
    out = {"inpaint_kept_max_abs_diff": float((audio - target)[..., ~span].abs().max()) if (~span).any() else 0.0,
           "inpaint_snr_db": snr_db(audio, target, span)}
    if info["end"] - info["start"] >= 1024:
        out["inpaint_mr_stft"] = multi_resolution_stft_distance(audio, target, span)["mr_stft"]
    return {k: v if v is not None and math.isfinite(v) else None for k, v in out.items()}
