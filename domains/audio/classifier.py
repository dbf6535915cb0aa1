"""Spoken-digit CNN classifier on log-mel features: the judge of the SC09 protocol (Donahue et al. 2019, WaveGAN)."""

from __future__ import annotations

import json
import math
import time
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

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """Network input [B,1,n_mels,frames] for audio [B,1,T]."""
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


def _augment_mel_power(power: torch.Tensor, noise_shape: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gain and additive white noise at a random peak-SNR, applied to mel power [B,M,F] (powers of uncorrelated signals add)."""
    b = power.shape[0]
    gain = 10.0 ** (torch.empty(b, 1, 1).uniform_(-12.0, 6.0, generator=gen) / 10.0)
    power = power * gain
    peak = power.amax(dim=(1, 2), keepdim=True)
    snr_db = torch.empty(b, 1, 1).uniform_(10.0, 60.0, generator=gen)
    use = (torch.rand(b, 1, 1, generator=gen) < 0.7).float()
    # A white-noise periodogram bin is exponentially distributed around its mean.
    fluctuation = -torch.log(torch.rand(power.shape, generator=gen).clamp_min(1e-12))
    noise = peak * 10.0 ** (-snr_db / 10.0) * noise_shape.view(1, -1, 1) * fluctuation
    return power + use * noise


def _augment_spectrogram(s: torch.Tensor, gen: torch.Generator, max_shift: float = 0.3) -> torch.Tensor:
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


def train_classifier(
    train: AudioClips,
    valid: AudioClips | None = None,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 0.05,
    augment: bool = True,
    label_smoothing: float = 0.0,
    device: str | torch.device | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[DigitClassifier, list[dict[str, float]]]:
    """Train a DigitClassifier with AdamW (Loshchilov & Hutter 2019), warm-up + cosine decay and feature-domain augmentation.

    Augmentation (``augment=True``) acts on mel power computed once per clip: gain, white noise at a random SNR,
    time shift, time stretch, mel-axis warp and SpecAugment masks. History rows: epoch, loss, train_acc
    (on augmented batches), seconds, and valid_acc when `valid` is given (reporting only, no model selection).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs = {"num_classes": len(train.class_names), "sample_rate": train.sample_rate, **(model_kwargs or {})}
    model = DigitClassifier(**kwargs).to(device)
    audio = audio_at(train.audio, train.sample_rate, model.sample_rate).float()
    labels = train.labels.long()
    n = audio.shape[0]
    if n == 0:
        raise ValueError("train has no clips")
    # Augmentation works on mel power, so the STFT of the training set is computed once.
    with torch.no_grad():
        power = torch.cat([model.logmel.mel(audio[i : i + 256, 0].to(device)).cpu() for i in range(0, n, 256)])
    fb_sum = model.logmel.mel.mel_scale.fb.sum(dim=0).cpu()
    noise_shape = fb_sum / fb_sum.max()
    floor = model.logmel.floor
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, max(1, total // 10))
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.dim() <= 1 else decay).append(param)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    history: list[dict[str, float]] = []
    columns = (
        TextColumn("[bold]classifier[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    step = 0
    start = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("epoch 1", total=total)
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                batch_power = power[idx]
                if augment:
                    batch_power = _augment_mel_power(batch_power, noise_shape, gen)
                spec = model.normalize(torch.log(batch_power.clamp_min(floor)))
                if augment:
                    spec = _augment_spectrogram(spec, gen)
                spec, y = spec.to(device), labels[idx].to(device)
                logits = model.head(model.embed_spectrogram(spec))
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(idx)
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f}")
            row = {
                "epoch": float(epoch + 1),
                "loss": loss_sum / seen,
                "train_acc": correct / seen,
                "seconds": time.perf_counter() - t0,
            }
            if valid is not None:
                row["valid_acc"] = accuracy(model, valid)
                bar.update(task, description=f"epoch {epoch + 1}/{epochs} valid {row['valid_acc']:.3f}")
            history.append(row)
    model.eval()
    model.meta = {"train_seconds": time.perf_counter() - start, "epochs": epochs, "seed": seed,
                  "class_names": list(train.class_names)}
    return model, history


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
