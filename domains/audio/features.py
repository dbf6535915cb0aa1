"""Log-mel features and spectrogram figures for mono waveforms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchaudio
from torch import nn


class LogMel(nn.Module):
    """Natural-log mel power spectrogram (Slaney 1998 mel filterbank, via torchaudio) with a floor: [B,1,T] -> [B,n_mels,frames]."""

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 160,
        n_mels: int = 64,
        f_min: float = 20.0,
        f_max: float | None = None,
        floor: float = 1e-5,
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.floor = floor
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=n_fft,
            hop_length=hop_length,
            f_min=f_min,
            f_max=f_max if f_max is not None else sample_rate / 2,
            n_mels=n_mels,
            power=2.0,
            center=True,
            pad_mode="constant",
            norm="slaney",
            mel_scale="slaney",
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Log-mel power of `audio` [B,1,T] (or [B,T]) as [B,n_mels,frames]."""
        if audio.dim() == 3:
            audio = audio.squeeze(1)
        spec = self.mel(audio.float())
        return torch.log(spec.clamp_min(self.floor))


def spectrogram_grid_png(
    audio: torch.Tensor,
    sample_rate: int,
    path: str | Path,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    n_mels: int = 80,
) -> Path:
    """Write a grid of log-mel spectrograms (dB) of `audio` [B,1,T] to a PNG file (matplotlib Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    audio = audio.detach().float().cpu()
    if audio.dim() == 2:
        audio = audio.unsqueeze(1)
    b = audio.shape[0]
    if titles is not None and len(titles) != b:
        raise ValueError(f"got {len(titles)} titles for {b} clips")
    ncols = ncols or min(b, 4)
    nrows = (b + ncols - 1) // ncols
    n_fft = 1024 if sample_rate >= 16000 else 512
    logmel = LogMel(sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels)
    with torch.no_grad():
        specs = logmel(audio) / torch.log(torch.tensor(10.0)) * 10.0  # dB
    vmax = float(specs.max())
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    seconds = audio.shape[-1] / sample_rate
    for i, ax in enumerate(axes.flat):
        if i >= b:
            ax.axis("off")
            continue
        ax.imshow(
            specs[i].numpy(),
            origin="lower",
            aspect="auto",
            cmap="magma",
            vmin=vmax - 80.0,
            vmax=vmax,
            extent=(0.0, seconds, 0, n_mels),
        )
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
        ax.set_xlabel("s", fontsize=8)
        ax.set_ylabel("mel bin", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
