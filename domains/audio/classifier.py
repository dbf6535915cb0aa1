"""Spoken-digit CNN classifier on log-mel features: the judge of the SC09 protocol (Donahue et al. 2019, WaveGAN)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from domains.audio.features import LogMel

if TYPE_CHECKING:
    from domains.audio.data import AudioClips

FORMAT = "multidiff.digit_classifier.v1"


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """Conv3x3 -> BatchNorm (Ioffe & Szegedy 2015) -> GELU (Hendrycks & Gimpel 2016) [-> 2x2 max-pool]."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class DigitClassifier(nn.Module):
    """Log-mel CNN (conv-BN-GELU blocks, mean+max pooling, dropout, linear) for spoken digits, the SC09 judge (Donahue et al. 2019)."""

    def __init__(
        self,
        num_classes: int = 10,
        sample_rate: int = 16000,
        n_mels: int = 64,
        hop_length: int | None = None,
        f_max: float | None = None,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128, 128),
        embed_dim: int = 128,
        dropout: float = 0.3,
        dynamic_range: float = 12.0,
    ) -> None:
        super().__init__()
        hop_length = hop_length or 1 << round(math.log2(sample_rate * 0.016))
        n_fft = 1 << max(8, math.ceil(math.log2(sample_rate * 0.064)))
        self.config: dict[str, Any] = {
            "num_classes": num_classes,
            "sample_rate": sample_rate,
            "n_mels": n_mels,
            "hop_length": hop_length,
            "f_max": f_max,
            "channels": list(channels),
            "embed_dim": embed_dim,
            "dropout": dropout,
            "dynamic_range": dynamic_range,
        }
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.dynamic_range = dynamic_range
        self.meta: dict[str, Any] = {}
        self.logmel = LogMel(sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_max=f_max,
                             floor=1e-10)
        blocks = []
        cin = 1
        for i, c in enumerate(channels):
            blocks.append(_conv_block(cin, c, pool=i < len(channels) - 1))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.embed = nn.Sequential(nn.Linear(2 * cin, embed_dim), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Peak-normalise a log-mel [B,n_mels,frames] to [B,1,n_mels,frames] in [-1,1]; invariant to input gain."""
        x = log_mel
        # The reference level never drops below floor + range, so digital silence maps to -1, not to +1.
        peak = x.amax(dim=(-2, -1), keepdim=True).clamp_min(math.log(self.logmel.floor) + self.dynamic_range)
        x = (x - peak).clamp_min(-self.dynamic_range)
        return (x / (0.5 * self.dynamic_range) + 1.0).unsqueeze(1)

    def check_length(self, audio: torch.Tensor) -> None:
        """ValueError unless clips [..., T] are long enough for one STFT frame of the log-mel front end."""
        need = self.logmel.n_fft // 2 + 1
        if audio.shape[-1] < need:
            raise ValueError(f"clips of {audio.shape[-1]} samples are too short for the digit classifier: its "
                             f"{self.logmel.n_fft}-point STFT needs at least {need} samples "
                             f"({need / self.sample_rate:.3f} s at {self.sample_rate} Hz)")

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """Network input [B,1,n_mels,frames] for audio [B,1,T]."""
        self.check_length(audio)
        return self.normalize(self.logmel(audio))

    def embed_spectrogram(self, spec: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding from a normalised spectrogram [B,1,n_mels,frames]."""
        h = self.blocks(spec)
        h = torch.cat([h.mean(dim=(-2, -1)), h.amax(dim=(-2, -1))], dim=1)
        return self.embed(h)

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [B, embed_dim] of audio [B,1,T] (the FID feature space)."""
        return self.embed_spectrogram(self.spectrogram(audio))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] of audio [B,1,T]."""
        return self.head(self.features(audio))


def audio_at(audio: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Resample [N,1,T] audio between rates (identity when equal)."""
    if from_rate == to_rate:
        return audio
    return torchaudio.functional.resample(audio, from_rate, to_rate)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def classifier_outputs(
    model: DigitClassifier, audio: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N,K] and penultimate features [N,D] (float32, CPU) of audio [N,1,T], in eval mode."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    logits, feats = [], []
    for start in range(0, audio.shape[0], batch_size):
        x = audio[start : start + batch_size].to(device, torch.float32)
        f = model.features(x)
        feats.append(f.float().cpu())
        logits.append(model.head(f).float().cpu())
    model.train(was_training)
    k = model.num_classes
    if not logits:
        return torch.empty(0, k), torch.empty(0, model.config["embed_dim"])
    return torch.cat(logits), torch.cat(feats)


def accuracy(model: DigitClassifier, clips: AudioClips, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on labelled clips."""
    audio = audio_at(clips.audio, clips.sample_rate, model.sample_rate)
    logits, _ = classifier_outputs(model, audio, batch_size)
    return float((logits.argmax(1) == clips.labels.cpu()).float().mean())


def augment_spectrogram(s: torch.Tensor, gen: torch.Generator, max_shift: float = 0.3) -> torch.Tensor:
    """Per-clip time shift, time stretch and low-anchored mel-axis warp (a cheap stand-in for speed and vocal-tract-length perturbation), then SpecAugment masks (Park et al. 2019) on normalised [B,1,M,F] input."""
    b, _, m, f = s.shape
    # affine_grid maps output coords in [-1,1] to input coords: u_in = a*u_out + c.
    t_scale = torch.empty(b).uniform_(0.85, 1.15, generator=gen)
    f_scale = torch.empty(b).uniform_(0.88, 1.12, generator=gen)
    shift = torch.empty(b).uniform_(-2.0 * max_shift, 2.0 * max_shift, generator=gen)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0 / t_scale
    theta[:, 0, 2] = shift
    theta[:, 1, 1] = 1.0 / f_scale
    theta[:, 1, 2] = 1.0 / f_scale - 1.0  # keeps the lowest mel bin in place
    grid = F.affine_grid(theta, [b, 1, m, f], align_corners=False)
    # Shift so that silence (-1) is 0 and the zero padding of grid_sample pads with silence.
    s = F.grid_sample(s + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    fill = s.mean(dim=(-2, -1), keepdim=True)
    mask = torch.zeros(b, 1, m, f, dtype=torch.bool)
    for _ in range(2):
        w = torch.randint(0, m // 8 + 1, (b,), generator=gen)
        s0 = (torch.rand(b, generator=gen) * (m - w + 1)).long()
        r = torch.arange(m).view(1, m)
        mask |= ((r >= s0[:, None]) & (r < (s0 + w)[:, None])).view(b, 1, m, 1)
        w = torch.randint(0, f // 10 + 1, (b,), generator=gen)
        s0 = (torch.rand(b, generator=gen) * (f - w + 1)).long()
        r = torch.arange(f).view(1, f)
        mask |= ((r >= s0[:, None]) & (r < (s0 + w)[:, None])).view(b, 1, 1, f)
    return torch.where(mask, fill, s)


def save_classifier(model: DigitClassifier, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write weights to safetensors with the config and `meta` as JSON metadata (no pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(model.config),
        "meta": json.dumps({**model.meta, **(meta or {})}),
    }
    save_file(state, str(path), metadata=metadata)
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """Rebuild a DigitClassifier from a safetensors file written by `save_classifier`; `.meta` holds its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file (format={metadata.get('format')!r})")
    model = DigitClassifier(**json.loads(metadata["config"]))
    model.load_state_dict(load_file(str(path)))
    model.meta = json.loads(metadata.get("meta", "{}"))
    return model.to(device).eval()
