"""SC09-protocol metrics against analytically known values."""

from __future__ import annotations

import math

import pytest
import torch

from domains.audio.classifier import DigitClassifier
from domains.audio.metrics import (
    SNR_CAP_DB,
    am_score,
    conditional_accuracy,
    evaluate_audio,
    frechet_distance,
    gaussian_frechet_distance,
    inception_score,
    kmeans,
    line_prominence_db,
    modified_inception_score,
    multi_resolution_stft_distance,
    ndb_k,
    snr_db,
)


def _one_hot(labels: torch.Tensor, k: int, eps: float = 0.0) -> torch.Tensor:
    """Rows (1-eps) on the label and eps/(k-1) elsewhere."""
    p = torch.full((len(labels), k), eps / (k - 1), dtype=torch.float64)
    p[torch.arange(len(labels)), labels] = 1.0 - eps
    return p


# ---------------------------------------------------------------- FID


def test_fid_of_a_sample_with_itself_is_zero() -> None:
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_mean_shift_is_the_squared_shift() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1500, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    assert frechet_distance(x, x + delta) == pytest.approx(float(delta.pow(2).sum()), rel=1e-8)


def test_gaussian_frechet_matches_closed_forms() -> None:
    # Commuting (diagonal) covariances: ||dmu||^2 + sum (sigma1 - sigma2)^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    expected = 1.0 + 9.0 + (1 - 3) ** 2 + (2 - 0.5) ** 2
    got = gaussian_frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-10)
    # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 matrix with non-negative eigenvalues.
    c1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    m = c1 @ c2
    tr_sqrt = math.sqrt(float(torch.trace(m)) + 2.0 * math.sqrt(float(torch.det(m))))
    expected = 0.25 + float(torch.trace(c1) + torch.trace(c2)) - 2.0 * tr_sqrt
    got = gaussian_frechet_distance(torch.tensor([0.5, 0.0]), c1, torch.zeros(2), c2)
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_of_samples_from_two_gaussians_approaches_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(2)
    c1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    mu1 = torch.tensor([0.5, 0.0], dtype=torch.float64)
    a = torch.randn(200_000, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(c1).T + mu1
    b = torch.randn(200_000, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(c2).T
    exact = gaussian_frechet_distance(mu1, c1, torch.zeros(2), c2)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)


# ---------------------------------------------------------------- IS, mIS, AM


def test_inception_score_of_confident_uniform_predictions_is_the_class_count() -> None:
    labels = torch.arange(500) % 10
    assert inception_score(_one_hot(labels, 10)) == pytest.approx(10.0, rel=1e-10)
    # Confident predictions with class marginal q give exp(H(q)).
    skewed = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    q = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert inception_score(_one_hot(skewed, 2)) == pytest.approx(float((-(q * q.log()).sum()).exp()), rel=1e-10)


def test_inception_scores_are_one_when_all_predictions_are_equal() -> None:
    p = torch.softmax(torch.randn(1, 10, generator=torch.Generator().manual_seed(3)), 1).repeat(64, 1)
    assert inception_score(p) == pytest.approx(1.0, abs=1e-10)
    assert modified_inception_score(p) == pytest.approx(1.0, abs=1e-10)


def test_modified_inception_score_matches_its_closed_form() -> None:
    k, eps = 10, 0.01
    p = _one_hot(torch.arange(1000) % k, k, eps)
    # KL between rows of different classes; a share 1 - 1/k of the ordered pairs differ in class.
    kl = (1 - eps - eps / (k - 1)) * math.log((1 - eps) * (k - 1) / eps)
    assert modified_inception_score(p) == pytest.approx(math.exp((1 - 1 / k) * kl), rel=1e-10)
    # The brute-force mean over all pairs agrees on an irregular input.
    q = torch.softmax(3 * torch.randn(40, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64), 1)
    pairwise = (q[:, None, :] * (q[:, None, :].log() - q[None, :, :].log())).sum(-1)
    assert modified_inception_score(q) == pytest.approx(float(pairwise.mean().exp()), rel=1e-10)


def test_am_score_is_zero_for_a_confident_classifier_matching_the_reference_marginal() -> None:
    labels = torch.arange(300) % 10
    ref = _one_hot(torch.arange(1000) % 10, 10)
    assert am_score(_one_hot(labels, 10), ref) == pytest.approx(0.0, abs=1e-12)


def test_am_score_adds_marginal_kl_and_mean_entropy() -> None:
    gen_labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    r = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert am_score(_one_hot(gen_labels, 3), reference_marginal=q) == pytest.approx(float((q * (q / r).log()).sum()))
    uniform = torch.full((50, 4), 0.25, dtype=torch.float64)
    assert am_score(uniform, reference_marginal=torch.full((4,), 0.25)) == pytest.approx(math.log(4))


def test_conditional_accuracy_counts_matching_argmax() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert conditional_accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5


# ---------------------------------------------------------------- NDB/K


def test_kmeans_recovers_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(5)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = centres.repeat_interleave(100, 0) + 0.1 * torch.randn(300, 2, generator=gen, dtype=torch.float64)
    found = kmeans(x, 3)
    assert torch.cdist(found, centres).min(1).values.max() < 0.1


def test_ndb_is_zero_for_identical_sets_and_high_for_disjoint_ones() -> None:
    gen = torch.Generator().manual_seed(6)
    real = torch.randn(2000, 8, generator=gen)
    assert ndb_k(real, real, k=50) == (0.0, 0)
    other = torch.randn(2000, 8, generator=gen)
    assert ndb_k(real, other, k=50)[0] <= 0.2  # same distribution: only chance rejections (alpha = 0.05)
    collapsed = real[:20].repeat(100, 1)  # a mode-collapsed generator reusing a few real points
    assert ndb_k(real, collapsed, k=50)[0] >= 0.5
    far = torch.randn(500, 8, generator=gen) + 20.0
    assert ndb_k(real, far, k=50)[0] >= 0.5


# ---------------------------------------------------------------- inpainting distances


def _tone(n: int = 4, t: int = 8000, amplitude: float = 0.5) -> torch.Tensor:
    time = torch.arange(t, dtype=torch.float64) / 8000
    freqs = torch.tensor([220.0, 330.0, 440.0, 550.0][:n], dtype=torch.float64)
    return (amplitude * torch.sin(2 * math.pi * freqs[:, None] * time)).unsqueeze(1)


def test_snr_of_identical_signals_is_at_the_cap() -> None:
    x = _tone()
    assert snr_db(x, x) == pytest.approx(SNR_CAP_DB)


def test_snr_of_signal_plus_known_noise() -> None:
    x = _tone()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    signal_power = x.pow(2).mean(dim=-1, keepdim=True)
    target_db = 17.0
    noise = noise / noise.pow(2).mean(dim=-1, keepdim=True).sqrt() * (signal_power / 10 ** (target_db / 10)).sqrt()
    assert snr_db(x + noise, x) == pytest.approx(target_db, abs=1e-9)
    # Noise only on a span, measured on that span.
    mask = torch.zeros(1, 1, x.shape[-1], dtype=torch.bool)
    mask[..., 2000:4000] = True
    span_noise = noise * mask
    span_power = x[..., 2000:4000].pow(2).mean(-1, keepdim=True)
    span_noise = span_noise / span_noise[..., 2000:4000].pow(2).mean(-1, keepdim=True).sqrt()
    span_noise = span_noise * (span_power / 10 ** (target_db / 10)).sqrt()
    assert snr_db(x + span_noise, x, mask) == pytest.approx(target_db, abs=1e-9)
    assert snr_db(x + span_noise, x) > target_db + 5  # the untouched part dilutes it without the mask


def test_snr_of_a_silent_target_is_undefined() -> None:
    x = _tone()
    mask = torch.zeros(1, 1, x.shape[-1], dtype=torch.bool)
    mask[..., 2000:4000] = True
    silent_there = x * ~mask  # e.g. a span in the padding after an inpainting input's end: no signal to compare with
    assert snr_db(x, silent_there, mask) is None  # was -293 dB
    assert snr_db(x, silent_there) is not None  # the whole clip has signal


def test_stft_distance_is_zero_for_identical_and_grows_with_noise() -> None:
    x = _tone()
    assert multi_resolution_stft_distance(x, x)["mr_stft"] == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    small = multi_resolution_stft_distance(x + 0.01 * noise, x)["mr_stft"]
    large = multi_resolution_stft_distance(x + 0.3 * noise, x)["mr_stft"]
    assert 0.0 < small < large
    mask = torch.zeros(x.shape[-1], dtype=torch.bool)
    mask[3000:5000] = True
    outside = x + 0.3 * noise * (~mask)  # damage only outside the span: the span distance stays 0
    assert multi_resolution_stft_distance(outside, x, mask)["mr_stft"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- evaluate_audio plumbing


def test_evaluate_audio_returns_every_applicable_metric() -> None:
    torch.manual_seed(0)
    clf = DigitClassifier().eval()
    audio = 0.1 * torch.randn(24, 1, 16000, generator=torch.Generator().manual_seed(9))
    labels = torch.arange(24) % 10
    basic = evaluate_audio(audio, clf)
    assert set(basic) == {"n", "is", "mis"}
    full = evaluate_audio(audio, clf, reference=audio, labels=labels, target=audio, ndb_bins=5)
    assert {"fid", "am", "ndb_k", "ndb", "cond_acc", "snr_db", "mr_stft"} <= set(full)
    assert full["fid"] == pytest.approx(0.0, abs=1e-6)
    assert full["ndb"] == 0.0
    assert full["snr_db"] == pytest.approx(SNR_CAP_DB)
    assert full["mr_stft"] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isfinite(v) for v in full.values())


def test_line_prominence_of_a_sinusoid_in_white_noise_matches_the_closed_form() -> None:
    """Hann-windowed on-bin sinusoid (amplitude A) over white noise (std s): peak/noise bin power = A^2 N / (6 s^2) + 1."""
    g = torch.Generator().manual_seed(0)
    sr, n_fft, amp, std = 16000, 1024, 0.05, 0.1
    t = torch.arange(sr, dtype=torch.float64) / sr
    audio = std * torch.randn(16, sr, generator=g, dtype=torch.float64) + amp * torch.sin(2 * math.pi * 2000 * t)
    lines = line_prominence_db(audio, sr, 1000.0, n_fft=n_fft)
    assert len(lines) == 7  # 1..7 kHz; 8 kHz is Nyquist
    expected = 10 * math.log10(amp**2 * n_fft / (6 * std**2) + 1)
    assert lines[1] == pytest.approx(expected, abs=0.5)
    assert all(abs(v) < 1.0 for i, v in enumerate(lines) if i != 1)


def test_line_prominence_sees_a_frame_periodic_residual() -> None:
    """A waveform repeating every 16 samples (a patchify head's artefact) puts lines at multiples of 1 kHz."""
    g = torch.Generator().manual_seed(1)
    noise = 0.1 * torch.randn(8, 16000, generator=g)
    periodic = 0.05 * torch.randn(16, generator=g).repeat(1000)
    clean = line_prominence_db(noise, 16000, 1000.0)
    dirty = line_prominence_db(noise + periodic, 16000, 1000.0)
    assert max(abs(v) for v in clean) < 1.0
    assert sum(dirty) / len(dirty) > 10.0
    with pytest.raises(ValueError, match="shorter than n_fft"):
        line_prominence_db(noise[:, :500], 16000, 1000.0)
