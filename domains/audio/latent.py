"""Latent audio diffusion (Rombach et al. 2022, LDM): the audio domain's bridge to a trained `AudioAutoencoder`.

With ``data.latent`` set, the denoiser trains and samples on the autoencoder's latents, normalised per channel by the
training set's mean and standard deviation (``data.latent_stats``, filled by ``AudioDomain.resolve``), and
``decode`` turns samples back into waveforms. The core sees one more Euclidean space ``[B, C, T / compression]``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
STAT_KEYS = ("channels", "compression", "sample_rate", "fingerprint")


def find_autoencoder(spec: str) -> Path:
    """``data.latent`` as an existing path: as given (relative to the working directory), else relative to the
    project root (how the shipped latent model names the shipped autoencoder); a clear error when neither exists."""
    given = Path(spec).expanduser()
    candidates = [given] if given.is_absolute() else [given, REPO_ROOT / given]
    for path in candidates:
        if path.exists():
            return path
    where = " or ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"data.latent={spec!r}: autoencoder not found at {where}; train one with `multidiff train "
                            f"audio --config autoencoder --out RUN` (and `multidiff export RUN FILE`), or point "
                            f"data.latent at it")


def _fingerprint(model: torch.nn.Module) -> str:
    """The first 16 hex digits of the sha256 of the weights (names, shapes and bytes): which autoencoder this is."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> Any:
    from domains.audio.autoencoder import build_autoencoder
    from multidiff.registry import read_run

    run = read_run(path)  # the registry's audio domain (no import of domains.audio.domain: it imports this module)
    if run.domain.name != "audio" or run.cfg.model.kind != "autoencoder":
        raise ValueError(f"{run.path}: not an audio autoencoder (a {run.domain.name} model, model.kind="
                         f"{getattr(run.cfg.model, 'kind', None)!r}); data.latent must "
                         f"name a run or export of `multidiff train audio --config autoencoder`")
    ae = run.load_into(build_autoencoder(run.cfg), "autoencoder.", what="autoencoder").eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    ae.fingerprint = _fingerprint(ae)
    ae.source = str(run.path)
    return ae


def load_autoencoder(spec: str) -> Any:
    """The `AudioAutoencoder` (EMA weights, eval mode, frozen) of a ``data.latent`` path; cached per file version."""
    path = find_autoencoder(spec)
    return _load(str(path.resolve()), file_stamp(path))


def file_stamp(path: Path) -> int:
    """The newest mtime (ns) of a file or of everything under a run directory: the cache key of its version."""
    return max((p.stat().st_mtime_ns for p in ([path] if path.is_file() else path.rglob("*"))), default=0)


def describe(ae: Any) -> dict[str, Any]:
    """What a latent model must agree on with its autoencoder."""
    return {"channels": ae.latent_channels, "compression": ae.compression, "sample_rate": ae.sample_rate,
            "fingerprint": ae.fingerprint}


@torch.no_grad()
def encode_clips(ae: Any, audio: Tensor, batch: int = 64) -> Tensor:
    """Latents (posterior means, fp32) of ``[N, 1, T]`` clips, in batches."""
    return torch.cat([ae.encode(audio[i: i + batch].float()) for i in range(0, audio.shape[0], batch)])


def compute_stats(ae: Any, audio: Tensor, max_clips: int = 1024) -> dict[str, Any]:
    """``describe(ae)`` plus the per-channel mean and std of the latents of (up to `max_clips` evenly spaced) clips."""
    idx = torch.linspace(0, audio.shape[0] - 1, min(max_clips, audio.shape[0])).round().long().unique()
    z = encode_clips(ae, audio[idx])
    return {**describe(ae), "mean": z.mean(dim=(0, 2)).tolist(), "std": z.std(dim=(0, 2)).clamp_min(1e-6).tolist()}


@dataclass(eq=False)
class LatentCodec:
    """An autoencoder with the latent model's normalisation: waveform <-> normalised latent."""

    ae: Any
    mean: Tensor  # [1, C, 1]
    std: Tensor

    @classmethod
    def of(cls, data: Any, sample_rate: int, length: int) -> LatentCodec:
        """The codec of a latent run's ``data`` section; errors name the file and the key that disagree."""
        ae = load_autoencoder(data.latent)
        stats = data.latent_stats
        if not stats:
            raise ValueError(f"data.latent={data.latent!r} but data.latent_stats is empty (the config was not resolved "
                             f"by AudioDomain.resolve)")
        have = describe(ae)
        for key in STAT_KEYS:
            if stats.get(key) != have[key]:
                raise ValueError(f"{ae.source}: the autoencoder's {key} is {have[key]!r} but this latent model was "
                                 f"trained with {stats.get(key)!r} (data.latent_stats.{key}); point data.latent at "
                                 f"the autoencoder it was trained with")
        if sample_rate != ae.sample_rate:
            raise ValueError(f"{ae.source}: the autoencoder works at {ae.sample_rate} Hz, data.sample_rate is "
                             f"{sample_rate} Hz")
        ae.check_length(length, f"clips ({length} samples, data.seconds x data.sample_rate)")
        shape = (1, len(stats["mean"]), 1)
        return cls(ae, torch.tensor(stats["mean"]).view(shape), torch.tensor(stats["std"]).view(shape))

    @property
    def channels(self) -> int:
        return self.ae.latent_channels

    @property
    def compression(self) -> int:
        return self.ae.compression

    def encode(self, audio: Tensor) -> Tensor:
        """``[N, 1, T]`` waveforms -> normalised latents ``[N, C, T / compression]``."""
        return (encode_clips(self.ae, audio) - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: Tensor, batch: int = 64) -> Tensor:
        """Normalised latents -> waveforms ``[N, 1, L * compression]`` (fp32, clamped to [-1, 1])."""
        z = z.detach().float().cpu() * self.std + self.mean
        return torch.cat([self.ae.decode(z[i: i + batch]) for i in range(0, z.shape[0], batch)]).clamp_(-1.0, 1.0)


class LatentDataset(torch.utils.data.Dataset):
    """Precomputed normalised latents as ``(latent [C, L], label)``; the training time shift moves whole latent frames
    and fills with the latent of silence (the waveform recipe's ``max_shift`` in samples / compression)."""

    def __init__(self, latents: Tensor, labels: Tensor, max_shift_frames: int, silence: Tensor) -> None:
        self.latents, self.labels = latents, labels
        self.max_shift = int(max_shift_frames)
        self.silence = silence  # [C, 1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        z = self.latents[i]
        if self.max_shift > 0:
            shift = int(torch.randint(-self.max_shift, self.max_shift + 1, ()))
            if shift:
                out = self.silence.expand_as(z).clone()
                if shift > 0:
                    out[:, shift:] = z[:, :-shift]
                else:
                    out[:, :shift] = z[:, -shift:]
                z = out
        return z, self.labels[i]
