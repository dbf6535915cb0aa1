"""Waveform augmentation for training the digit classifier (the judge): the recording conditions real clips come in.

Applied on the fly to each training batch by ``ClassifierLoss`` (never at evaluation), in this order, each clip
drawing its own settings from one torch generator (the global one in training, so a resumed run continues its
stream):

- ``speed``: resampling-based speed perturbation (Ko et al. 2015): pitch and tempo together by a factor in
  `SPEEDS` (torchaudio's windowed-sinc resampler between two small integer rates), then centre-cropped / padded
  back to the clip length;
- ``reverb``: convolution (torchaudio's FFT convolution) with a synthetic room impulse response, a direct path
  plus exponentially decaying Gaussian noise whose energy falls 60 dB in RT60 seconds (the statistical model of
  late reverberation, Polack 1988), at a random direct-to-reverberant ratio;
- ``gain``: a random gain in dB, then hard clipping at full scale (loud recordings clip);
- ``noise``: white or low-passed (torchaudio biquad, one 300-3000 Hz cutoff per batch) Gaussian noise at a random
  SNR (torchaudio ``add_noise``; the SNR is over the whole clip, silence included);
- ``telephone``: band-limiting to 4 kHz by resampling to 8 kHz and back (the path of 8 kHz telephone audio; the
  FSDD recordings are 8 kHz files);
- ``spectrogram``: on the log-mel input instead of the waveform: time shift, time stretch, mel-axis warp and
  SpecAugment masks (Park et al. 2019), `domains.audio.classifier.augment_spectrogram`.

``model.augment`` names the ones a recipe uses (``true``: all of `AUGMENTATIONS`, ``false``: none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchaudio.functional as AF
from scipy.fft import next_fast_len
from torch import Tensor

__all__ = ["AUGMENTATIONS", "SPEEDS", "AugmentSettings", "add_noise", "apply_gain", "augment_waveforms",
           "augmentation_names", "band_limit", "change_speed", "fit_length", "reverberate", "synthetic_rir"]

WAVEFORM_AUGMENTATIONS = ("speed", "reverb", "gain", "noise", "telephone")
AUGMENTATIONS = (*WAVEFORM_AUGMENTATIONS, "spectrogram")
# speed factors as (numerator, denominator): small integers keep the sinc resampler's kernel small
SPEEDS: tuple[tuple[int, int], ...] = ((17, 20), (18, 20), (19, 20), (21, 20), (22, 20), (23, 20))


def augmentation_names(value: bool | Sequence[str], field: str = "model.augment") -> tuple[str, ...]:
    """The augmentations a config value asks for: true = all, false = none, else the listed names (checked)."""
    if isinstance(value, bool):
        return AUGMENTATIONS if value else ()
    names = tuple(value)
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"{field}: unknown augmentation(s) {unknown}; known: {', '.join(AUGMENTATIONS)} "
                         f"(or true for all, false for none)")
    return names


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of the waveform augmentations (uniform draws per clip)."""

    p_speed: float = 0.6
    p_reverb: float = 0.3
    rt60_s: tuple[float, float] = (0.1, 0.6)
    drr_db: tuple[float, float] = (-3.0, 12.0)  # direct-to-reverberant energy ratio
    gain_db: tuple[float, float] = (-18.0, 6.0)
    p_noise: float = 0.5
    snr_db: tuple[float, float] = (5.0, 40.0)
    p_coloured: float = 0.5  # of the noisy clips: noise low-passed at 300-3000 Hz instead of white
    p_telephone: float = 0.3


# --- the operations (each a closed form the tests check) ----------------------------------------------------------


def apply_gain(audio: Tensor, gain_db: Tensor | float) -> Tensor:
    """``audio * 10^(gain_db / 20)``; `gain_db` per clip ([B] for audio [B, 1, T]) or one number. No clipping."""
    g = torch.as_tensor(gain_db, dtype=audio.dtype, device=audio.device)
    if g.dim() == 1:
        g = g.view(-1, *([1] * (audio.dim() - 1)))
    return audio * torch.pow(10.0, g / 20.0)


def add_noise(audio: Tensor, noise: Tensor, snr_db: Tensor | float) -> Tensor:
    """`audio` plus `noise` scaled so that signal power / noise power = `snr_db` per clip (torchaudio add_noise)."""
    snr = torch.as_tensor(snr_db, dtype=audio.dtype, device=audio.device).expand(audio.shape[:-1])
    return AF.add_noise(audio, noise, snr)


def synthetic_rir(rt60_s: float, sample_rate: int, drr_db: float, generator: torch.Generator | None = None,
                  max_seconds: float = 0.5) -> Tensor:
    """A room impulse response [L]: a unit direct path at 0 and a Gaussian-noise tail whose amplitude decays as
    ``exp(-3 ln(10) t / rt60)`` (energy -60 dB at ``t = rt60``), scaled to `drr_db` below the direct path's energy;
    L = min(rt60, max_seconds) seconds."""
    if rt60_s <= 0:
        raise ValueError(f"rt60 must be > 0 s, got {rt60_s}")
    n = max(2, int(round(min(rt60_s, max_seconds) * sample_rate)))
    t = torch.arange(1, n) / sample_rate
    tail = torch.randn(n - 1, generator=generator) * torch.exp(-3.0 * math.log(10.0) * t / rt60_s)
    tail = tail / tail.pow(2).sum().sqrt() * 10.0 ** (-drr_db / 20.0)
    return torch.cat([torch.ones(1), tail])


def reverberate(audio: Tensor, rir: Tensor) -> Tensor:
    """`audio` [..., T] convolved with `rir` ([L] or [..., L], broadcast), cut to the first T samples (FFT convolution)."""
    rir = rir.to(audio.dtype).reshape((1,) * (audio.dim() - rir.dim()) + tuple(rir.shape))
    return AF.fftconvolve(audio, rir)[..., : audio.shape[-1]]


def change_speed(audio: Tensor, num: int, den: int) -> Tensor:
    """Play `audio` [..., T] ``num/den`` times as fast (pitch and tempo by that factor): resampled from rate `num`
    to rate `den`, so the result has ``ceil(T * den / num)`` samples."""
    if num < 1 or den < 1:
        raise ValueError(f"speed factor {num}/{den}: both must be positive integers")
    return AF.resample(audio, num, den)


def fit_length(audio: Tensor, length: int) -> Tensor:
    """Centre-crop or centre-zero-pad [..., T] to [..., length] (the datasets' rule: the odd extra sample at the end)."""
    n = audio.shape[-1]
    if n >= length:
        start = (n - length) // 2
        return audio[..., start : start + length]
    left = (length - n) // 2
    return torch.nn.functional.pad(audio, (left, length - n - left))


def band_limit(audio: Tensor, sample_rate: int, to_rate: int = 8000) -> Tensor:
    """Down to `to_rate` and back (torchaudio sinc resampler): no energy above ``to_rate / 2``, same length."""
    if to_rate >= sample_rate:
        return audio
    out = AF.resample(AF.resample(audio, sample_rate, to_rate), to_rate, sample_rate)
    return fit_length(out, audio.shape[-1])


# --- the training pipeline ----------------------------------------------------------------------------------------


def _uniform(n: int, lo_hi: tuple[float, float], gen: torch.Generator) -> Tensor:
    return torch.empty(n).uniform_(lo_hi[0], lo_hi[1], generator=gen)


def augment_waveforms(audio: Tensor, sample_rate: int, names: Sequence[str], generator: torch.Generator,
                      settings: AugmentSettings = AugmentSettings()) -> Tensor:
    """The waveform augmentations in `names` (speed, reverb, gain, noise, telephone, in that order) on a batch
    [B, 1, T] of clips; same shape out. Each clip draws its own settings from `generator`."""
    if audio.dim() != 3 or audio.shape[1] != 1:
        raise ValueError(f"augment_waveforms expects audio [B, 1, T], got {tuple(audio.shape)}")
    b, _, length = audio.shape
    x = audio.float()
    gen = generator
    s = settings
    if "speed" in names:
        choice = torch.randint(0, len(SPEEDS), (b,), generator=gen)
        use = torch.rand(b, generator=gen) < s.p_speed
        x = x.clone()
        for k, (num, den) in enumerate(SPEEDS):
            idx = torch.nonzero(use & (choice == k)).flatten()
            if len(idx):
                x[idx] = fit_length(change_speed(x[idx], num, den), length)
    if "reverb" in names:
        use = torch.nonzero(torch.rand(b, generator=gen) < s.p_reverb).flatten().tolist()
        if use:
            rirs = [synthetic_rir(float(_uniform(1, s.rt60_s, gen)), sample_rate, float(_uniform(1, s.drr_db, gen)),
                                  gen) for _ in use]
            # zero-pad the responses so that the FFT size T + L - 1 has only small prime factors (scipy's choice)
            longest = next_fast_len(length + max(len(r) for r in rirs) - 1, real=True) - length + 1
            bank = torch.stack([torch.nn.functional.pad(r, (0, longest - len(r))) for r in rirs]).unsqueeze(1)
            wet = reverberate(x[use], bank)
            # keep the peak level (the reverberant sum can exceed full scale)
            peak_in = x[use].abs().amax(-1, keepdim=True)
            peak_out = wet.abs().amax(-1, keepdim=True).clamp_min(1e-8)
            x = x.clone()
            x[use] = wet * (peak_in / peak_out)
    if "gain" in names:
        x = apply_gain(x, _uniform(b, s.gain_db, gen)).clamp(-1.0, 1.0)
    if "noise" in names:
        use = torch.nonzero(torch.rand(b, generator=gen) < s.p_noise).flatten()
        if len(use):
            noise = torch.randn(len(use), 1, length, generator=gen)
            coloured = torch.nonzero(torch.rand(len(use), generator=gen) < s.p_coloured).flatten()
            if len(coloured):
                cutoff = float(_uniform(1, (300.0, 3000.0), gen))
                noise[coloured] = AF.lowpass_biquad(noise[coloured], sample_rate, cutoff)
            x = x.clone()
            x[use] = add_noise(x[use], noise, _uniform(len(use), s.snr_db, gen).view(-1, 1))
    if "telephone" in names and sample_rate > 8000:
        use = torch.nonzero(torch.rand(b, generator=gen) < s.p_telephone).flatten()
        if len(use):
            x = x.clone()
            x[use] = band_limit(x[use], sample_rate)
    return x.to(audio.dtype)
