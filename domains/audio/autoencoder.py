"""A convolutional waveform autoencoder for latent audio diffusion (Rombach et al. 2022, LDM; SEANet-style encoder and
decoder as in SoundStream, Zeghidour et al. 2021), trained with a multi-resolution STFT + waveform L1 loss and a
small KL term (a VAE, Kingma & Welling 2014) that keeps the latents well scaled for a diffusion model.

    multidiff train audio --config autoencoder --out runs/audio_ae            # model.kind=autoencoder
    multidiff export runs/audio_ae data/checkpoints/audio_autoencoder.safetensors
    multidiff train audio --config fast --out runs/audio                      # latent diffusion; data.latent=that file

The encoder maps ``[B, 1, T]`` to ``[B, C, T / compression]`` (the posterior mean is the latent), the decoder maps it
back. ``compression`` is the product of the strides; every stride must be even (the strided conv and its transposed
twin then change the length by exactly that factor).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AudioAutoencoder", "AutoencoderLoss", "build_autoencoder", "mr_stft_loss"]


class _ResUnit(nn.Module):
    """``x + conv1x1(SiLU(dilated conv(SiLU(x))))`` (SoundStream's residual unit)."""

    def __init__(self, channels: int, dilation: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=dilation * (kernel_size // 2))
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.silu(self.conv(F.silu(x))))


DILATIONS = (1, 3)
KERNEL = 7


class AudioAutoencoder(nn.Module):
    """SEANet-style waveform VAE: ``encode`` -> posterior mean and log-variance, ``decode`` -> waveform."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128, 256), strides: tuple[int, ...] = (2, 4, 4, 2),
                 latent_channels: int = 16, sample_rate: int = 16000) -> None:
        super().__init__()
        if len(channels) != len(strides) + 1:
            raise ValueError(f"model.ae_channels needs one entry more than model.ae_strides (a width per level), got "
                             f"{len(channels)} and {len(strides)}")
        bad = [s for s in strides if s < 2 or s % 2]
        if bad:
            raise ValueError(f"model.ae_strides must be even numbers >= 2 (got {list(strides)}): a stride-s conv with "
                             f"kernel 2s then divides the length by exactly s")
        if latent_channels < 1:
            raise ValueError(f"model.latent_channels must be >= 1, got {latent_channels}")
        self.config = {"channels": list(channels), "strides": list(strides), "latent_channels": latent_channels,
                       "sample_rate": sample_rate}
        self.strides = tuple(strides)
        self.latent_channels = latent_channels
        self.sample_rate = sample_rate
        self.compression = math.prod(strides)
        enc: list[nn.Module] = [nn.Conv1d(1, channels[0], KERNEL, padding=KERNEL // 2)]
        for i, s in enumerate(strides):
            enc += [_ResUnit(channels[i], d) for d in DILATIONS]
            enc += [nn.SiLU(), nn.Conv1d(channels[i], channels[i + 1], 2 * s, stride=s, padding=s // 2)]
        enc += [nn.SiLU(), nn.Conv1d(channels[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv1d(latent_channels, channels[-1], KERNEL, padding=KERNEL // 2)]
        for i in reversed(range(len(strides))):
            s = strides[i]
            dec += [nn.SiLU(), nn.ConvTranspose1d(channels[i + 1], channels[i], 2 * s, stride=s, padding=s // 2)]
            dec += [_ResUnit(channels[i], d) for d in DILATIONS]
        dec += [nn.SiLU(), nn.Conv1d(channels[0], 1, KERNEL, padding=KERNEL // 2)]
        self.decoder = nn.Sequential(*dec)

    @property
    def receptive_field(self) -> int:
        """Input samples that one latent frame sees (the encoder's receptive field)."""
        rf, jump = KERNEL, 1
        for s in self.strides:
            rf += sum((KERNEL - 1) * d for d in DILATIONS) * jump
            rf += (2 * s - 1) * jump
            jump *= s
        return rf + 2 * jump  # the final 3-tap conv

    def check_length(self, length: int, what: str = "clips") -> None:
        """A clear error when `length` samples cannot be encoded (not a multiple of the compression, or shorter
        than the receptive field)."""
        if length % self.compression:
            raise ValueError(f"{what} of {length} samples are not a multiple of the autoencoder's compression "
                             f"{self.compression} (product of model.ae_strides)")
        if length < self.receptive_field:
            raise ValueError(f"{what} of {length} samples are shorter than the autoencoder's receptive field "
                             f"({self.receptive_field} samples = {self.receptive_field / self.sample_rate:.3f} s at "
                             f"{self.sample_rate} Hz); use longer clips (data.seconds, model.ae_segment) or smaller "
                             f"model.ae_strides")

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 1, T]`` -> posterior mean and log-variance ``[B, C, T / compression]`` each."""
        self.check_length(x.shape[-1])
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)

    def encode(self, x: Tensor) -> Tensor:
        """The latent of a waveform: the posterior mean ``[B, C, T / compression]``."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """``[B, C, L]`` -> waveform ``[B, 1, L * compression]``."""
        if z.ndim != 3 or z.shape[1] != self.latent_channels:
            raise ValueError(f"the decoder expects latents [B, {self.latent_channels}, L], got {tuple(z.shape)}")
        return self.decoder(z)


def build_autoencoder(cfg: Any) -> AudioAutoencoder:
    """The autoencoder of an audio run config (``model.ae_*``, ``model.latent_channels``, ``data.sample_rate``)."""
    m = cfg.model
    return AudioAutoencoder(tuple(m.ae_channels), tuple(m.ae_strides), m.latent_channels, cfg.data.sample_rate)


def mr_stft_loss(estimate: Tensor, target: Tensor, fft_sizes: tuple[int, ...] = (2048, 1024, 512, 256, 128),
                 eps: float = 1e-5) -> Tensor:
    """Multi-resolution STFT loss: spectral convergence + L1 of log magnitudes, mean over FFT sizes (Yamamoto et al.
    2020). `eps` sets how deep into silence the log term looks (1e-5 ~ -100 dB): it is what teaches the decoder
    to leave silence silent."""
    est, tgt = estimate.reshape(-1, estimate.shape[-1]).float(), target.reshape(-1, target.shape[-1]).float()
    total = est.new_zeros(())
    for n in fft_sizes:
        win = torch.hann_window(n, device=est.device)
        kw: dict[str, Any] = {"n_fft": n, "hop_length": n // 4, "window": win, "return_complex": True}
        me, mt = torch.stft(est, **kw).abs(), torch.stft(tgt, **kw).abs()
        sc = torch.linalg.norm(mt - me, dim=(-2, -1)) / torch.linalg.norm(mt, dim=(-2, -1)).clamp_min(1e-6)
        lm = ((me + eps).log() - (mt + eps).log()).abs().mean(dim=(-2, -1))
        total = total + (sc + lm).mean()
    return total / len(fft_sizes)


class AutoencoderLoss(nn.Module):
    """``forward(batch)`` = MR-STFT + ``wave_weight`` x L1 + ``kl_weight`` x KL(q(z|x) || N(0, I)) on random
    ``segment``-sample crops of the batch's clips (the autoencoder is convolutional, so it trains on crops)."""

    def __init__(self, autoencoder: AudioAutoencoder, segment: int, wave_weight: float = 1.0,
                 kl_weight: float = 1e-4) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        autoencoder.check_length(segment, "model.ae_segment crops")
        self.segment = segment
        self.wave_weight = wave_weight
        self.kl_weight = kl_weight

    def crop(self, audio: Tensor) -> Tensor:
        """A random ``segment``-long crop of each clip (global RNG, so a resumed run continues its stream)."""
        b, _, t = audio.shape
        if t < self.segment:
            raise ValueError(f"autoencoder training got clips of {t} samples, shorter than model.ae_segment="
                             f"{self.segment}; lower model.ae_segment or use longer clips (data.seconds)")
        if t == self.segment:
            return audio
        start = torch.randint(0, t - self.segment + 1, (b,))
        idx = start[:, None] + torch.arange(self.segment)[None, :]
        return audio.gather(-1, idx[:, None, :].to(audio.device))

    def forward(self, batch: Any) -> Tensor:
        audio = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = self.crop(audio.float())
        mean, logvar = self.autoencoder.posterior(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.training else mean
        y = self.autoencoder.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return mr_stft_loss(y, x) + self.wave_weight * (y - x).abs().mean() + self.kl_weight * kl
