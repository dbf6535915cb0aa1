"""The classifier's waveform augmentations against closed forms: gain, SNR, RT60 / DRR of the synthetic room response,
speed (length and pitch), the 4 kHz band limit; the batch pipeline and the config's augmentation names."""

from __future__ import annotations

import math

import pytest
import torch

from domains.audio.augment import (
    AUGMENTATIONS,
    SPEEDS,
    add_noise,
    apply_gain,
    augment_waveforms,
    augmentation_names,
    band_limit,
    change_speed,
    fit_length,
    reverberate,
    synthetic_rir,
)

SR = 16000


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).mean(-1).sqrt()


def _tone(freq: float, n: int = SR, amp: float = 0.3) -> torch.Tensor:
    return amp * torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / SR).float()


def _peak_hz(x: torch.Tensor) -> float:
    """Frequency of the largest spectral peak of a 1-D signal (zero-padded to 1 Hz bins, Hann window)."""
    spec = torch.fft.rfft(x.double() * torch.hann_window(x.shape[-1], dtype=torch.float64), n=SR).abs()
    return float(spec.argmax())  # 1 Hz per bin at n = SR


def _share_above(x: torch.Tensor, hz: float) -> float:
    power = torch.fft.rfft(x.double()).abs().pow(2)
    freqs = torch.fft.rfftfreq(x.shape[-1], 1.0 / SR)
    return float(power[..., freqs > hz].sum() / power.sum())


def test_gain_scales_rms_by_exactly_the_factor() -> None:
    x = 0.05 * torch.randn(3, 1, SR, generator=torch.Generator().manual_seed(0))
    gains = torch.tensor([-12.0, 0.0, 6.0])
    y = apply_gain(x, gains)
    ratio = _rms(y).flatten() / _rms(x).flatten()
    assert torch.allclose(ratio, torch.tensor([10 ** (-12 / 20), 1.0, 10 ** (6 / 20)], dtype=torch.float64),
                          rtol=1e-6)
    assert torch.allclose(apply_gain(x, 20.0), 10.0 * x, rtol=1e-6)  # one number for all clips


def test_noise_at_snr_s_gives_measured_snr_s() -> None:
    g = torch.Generator().manual_seed(1)
    x = _tone(440.0).view(1, 1, SR).repeat(4, 1, 1) * torch.tensor([1.0, 0.1, 0.5, 2.0]).view(4, 1, 1)
    noise = torch.randn(4, 1, SR, generator=g)
    snr = torch.tensor([0.0, 10.0, 20.0, 35.0])
    y = add_noise(x, noise, snr.view(4, 1))
    measured = 10 * torch.log10(x.double().pow(2).sum(-1) / (y - x).double().pow(2).sum(-1)).flatten()
    assert torch.allclose(measured, snr.double(), atol=1e-3), measured


def test_synthetic_room_response_decays_60_db_in_rt60_and_has_the_asked_drr() -> None:
    for rt60, drr in ((0.3, 0.0), (0.5, 10.0)):
        h = synthetic_rir(rt60, SR, drr, torch.Generator().manual_seed(2), max_seconds=rt60)
        assert h.shape == (round(rt60 * SR),) and h[0] == 1.0
        tail = h[1:].double()
        assert math.isclose(float(tail.pow(2).sum()), 10 ** (-drr / 10), rel_tol=1e-5)  # direct energy 1
        # Schroeder backward integration of the tail; the slope between -5 and -25 dB extrapolates to -60 dB at rt60
        edc = tail.pow(2).flip(0).cumsum(0).flip(0)
        edc_db = 10 * torch.log10(edc / edc[0])
        t = torch.arange(1, len(h), dtype=torch.float64) / SR
        sel = (edc_db < -5) & (edc_db > -25)
        slope = float(torch.linalg.lstsq(torch.stack([t[sel], torch.ones_like(t[sel])], 1),
                                         edc_db[sel].unsqueeze(1)).solution[0])
        assert math.isclose(-60.0 / slope, rt60, rel_tol=0.05), (-60.0 / slope, rt60)
    with pytest.raises(ValueError, match="rt60"):
        synthetic_rir(0.0, SR, 0.0)


def test_reverberation_is_a_causal_convolution() -> None:
    x = torch.randn(2, 1, 4000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(reverberate(x, torch.tensor([1.0])), x, atol=1e-5)  # unit impulse: unchanged
    delayed = reverberate(x, torch.tensor([0.0, 0.0, 0.5]))  # 2-sample delay, half amplitude
    assert delayed.shape == x.shape
    assert torch.allclose(delayed[..., 2:], 0.5 * x[..., :-2], atol=1e-5) and delayed[..., :2].abs().max() < 1e-5


@pytest.mark.parametrize("num, den", SPEEDS)
def test_speed_changes_length_and_pitch_by_the_factor(num: int, den: int) -> None:
    x = _tone(500.0).view(1, 1, SR)
    y = change_speed(x, num, den)
    assert y.shape[-1] == math.ceil(SR * den / num)  # tempo: the duration scales by 1 / factor
    assert abs(_peak_hz(y[0, 0]) - 500.0 * num / den) <= 2.0  # pitch: the tone moves by the factor


def test_fit_length_centres_like_the_datasets() -> None:
    x = torch.arange(1.0, 6.0).view(1, 1, 5)
    assert fit_length(x, 9).tolist() == [[[0, 0, 1, 2, 3, 4, 5, 0, 0]]]
    assert fit_length(x, 8).tolist() == [[[0, 1, 2, 3, 4, 5, 0, 0]]]  # the odd extra sample goes at the end
    assert fit_length(x, 3).tolist() == [[[2, 3, 4]]]


def test_band_limit_leaves_under_1_percent_of_white_noise_energy_above_4_khz() -> None:
    noise = torch.randn(4, 1, SR, generator=torch.Generator().manual_seed(4))
    assert _share_above(noise, 4000.0) > 0.45  # white noise at 16 kHz: half its energy is above 4 kHz
    y = band_limit(noise, SR)
    assert y.shape == noise.shape
    assert _share_above(y, 4000.0) < 0.01
    tone = _tone(1000.0).view(1, 1, SR)  # the pass band goes through (away from the clip edges)
    kept = band_limit(tone, SR)[..., 1000:-1000]
    assert math.isclose(float(_rms(kept)), float(_rms(tone[..., 1000:-1000])), rel_tol=1e-3)
    high = band_limit(_tone(6000.0).view(1, 1, SR), SR)[..., 1000:-1000]
    assert float(_rms(high)) < 10 ** (-50 / 20) * float(_rms(tone))  # a 6 kHz tone is > 50 dB down (55 measured)


def test_pipeline_keeps_shape_is_seeded_and_changes_the_clips() -> None:
    x = 0.2 * torch.randn(8, 1, SR, generator=torch.Generator().manual_seed(5))
    names = [n for n in AUGMENTATIONS if n != "spectrogram"]
    a = augment_waveforms(x, SR, names, torch.Generator().manual_seed(6))
    b = augment_waveforms(x, SR, names, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    assert torch.isfinite(a).all()
    assert torch.equal(augment_waveforms(x, SR, [], torch.Generator()), x)
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        augment_waveforms(x[:, 0], SR, names, torch.Generator())


def test_augmentation_names_from_the_config() -> None:
    assert augmentation_names(True) == AUGMENTATIONS and augmentation_names(False) == ()
    assert augmentation_names(["gain", "noise"]) == ("gain", "noise")
    with pytest.raises(ValueError, match=r"model\.augment: unknown augmentation\(s\) \['revreb'\]"):
        augmentation_names(["gain", "revreb"])
