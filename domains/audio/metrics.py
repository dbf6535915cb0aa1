"""SC09-protocol sample metrics (FID, IS, mIS, AM, NDB/K, conditional accuracy) and inpainting distances."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from domains.audio.classifier import DigitClassifier, audio_at, classifier_outputs

if TYPE_CHECKING:
    from domains.audio.data import AudioClips

_TINY = 1e-300  # float64 floor for probabilities inside logarithms
SNR_CAP_DB = 120.0


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    p = _f64(probs)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"expected probabilities [N,K] with N>0, got {tuple(p.shape)}")
    return p


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """Row sums of p*log(p) with 0*log(0) = 0."""
    return torch.special.xlogy(p, p).sum(dim=-1)


def gaussian_frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1,cov1) and N(mu2,cov2) (Dowson & Landau 1982; FID, Heusel et al. 2017)."""
    mu1, cov1, mu2, cov2 = _f64(mu1), _f64(cov1), _f64(mu2), _f64(cov2)
    cov1 = 0.5 * (cov1 + cov1.T)
    cov2 = 0.5 * (cov2 + cov2.T)
    lam, vec = torch.linalg.eigh(cov1)
    root1 = (vec * lam.clamp_min(0.0).sqrt()) @ vec.T
    # tr sqrt(C1 C2) = tr sqrt(C1^1/2 C2 C1^1/2): the latter is symmetric PSD, so eigvalsh is stable.
    inner = root1 @ cov2 @ root1
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp_min(0.0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * tr_sqrt
    return float(value.clamp_min(0.0))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID between Gaussian fits of two feature sets [N,D], [M,D] (Heusel et al. 2017)."""
    a, b = _f64(feats_a), _f64(feats_b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least two samples per set")
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                     b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def inception_score(probs: torch.Tensor) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016)."""
    p = _check_probs(probs)
    marginal = p.mean(0)
    kl = _plogp(p) - p @ marginal.clamp_min(_TINY).log()
    return float(kl.mean().exp())


def modified_inception_score(probs: torch.Tensor) -> float:
    """mIS = exp(E_{x,x'} KL(p(y|x) || p(y|x'))) over all ordered pairs (Gurumurthy et al. 2017, DeLiGAN)."""
    p = _check_probs(probs)
    # E_{i,j}[sum p_i log p_i - p_i . log p_j] = mean_i(sum p_i log p_i) - mean_i(p_i) . mean_j(log p_j): O(NK).
    mean_kl = _plogp(p).mean() - p.mean(0) @ p.clamp_min(_TINY).log().mean(0)
    return float(mean_kl.exp())


def am_score(probs: torch.Tensor, reference_probs: torch.Tensor | None = None,
             reference_marginal: torch.Tensor | None = None) -> float:
    """AM = KL(p*(y) || p(y)) + E_x H(p(y|x)), p* the real data's class marginal (Zhou et al. 2018)."""
    p = _check_probs(probs)
    if reference_marginal is None:
        if reference_probs is None:
            raise ValueError("am_score needs reference_probs or reference_marginal")
        reference_marginal = _check_probs(reference_probs).mean(0)
    p_star = _f64(reference_marginal)
    p_star = p_star / p_star.sum()
    marginal = p.mean(0)
    kl = _plogp(p_star) - p_star @ marginal.clamp_min(_TINY).log()
    entropy = -_plogp(p).mean()
    return float(kl + entropy)


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007); returns centroids [k,D]."""
    x = _f64(x)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = torch.cdist(x, centres).pow(2).squeeze(1)
    for _ in range(1, k):
        weights = d2 if d2.sum() > 0 else torch.ones(n, dtype=torch.float64)
        nxt = x[torch.multinomial(weights, 1, generator=gen)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).pow(2).squeeze(1))
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k).to(torch.float64)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        keep = counts > 0  # an emptied cluster keeps its old centre
        centres[keep] = sums[keep] / counts[keep, None]
    return centres


def ndb_k(real_feats: torch.Tensor, gen_feats: torch.Tensor, k: int = 50, alpha: float = 0.05,
          seed: int = 0) -> tuple[float, int]:
    """NDB/K: share of k-means bins (fit on real features) whose real vs generated proportions differ by a two-proportion z-test at `alpha` (Richardson & Weiss 2018); returns (NDB/K, NDB)."""
    real, gen = _f64(real_feats), _f64(gen_feats)
    k = min(k, real.shape[0])
    centres = kmeans(real, k, seed=seed)
    n1, n2 = real.shape[0], gen.shape[0]
    p1 = torch.bincount(torch.cdist(real, centres).argmin(1), minlength=k).double() / n1
    p2 = torch.bincount(torch.cdist(gen, centres).argmin(1), minlength=k).double() / n2
    pooled = (n1 * p1 + n2 * p2) / (n1 + n2)
    se = (pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt()
    z = torch.where(se > 0, (p1 - p2).abs() / se.clamp_min(_TINY), torch.zeros_like(se))
    p_value = torch.erfc(z / math.sqrt(2.0))
    ndb = int((p_value < alpha).sum())
    return ndb / k, ndb


def conditional_accuracy(logits_or_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples classified as the label they were generated for."""
    pred = logits_or_probs.argmax(dim=1).cpu()
    return float((pred == labels.cpu().long()).double().mean())


def line_prominence_db(audio: torch.Tensor, sample_rate: int, spacing_hz: float, n_fft: int = 1024) -> list[float]:
    """Spectral lines at multiples of ``spacing_hz`` (below Nyquist), each in dB over its neighbourhood's median.

    Mean STFT power of ``audio`` [N, T] (Hann, hop n_fft / 4); line k is the peak of the three bins around
    k * spacing_hz, its neighbourhood the bins 3..10 away on both sides. ~0 dB: no line; a patchified
    waveform model's frame-periodic residual shows as lines at multiples of sample_rate / patch.
    """
    x = _f64(audio).reshape(-1, audio.shape[-1])
    if x.shape[-1] < n_fft:
        raise ValueError(f"line_prominence_db: clips of {x.shape[-1]} samples are shorter than n_fft={n_fft}")
    spec = torch.stft(x, n_fft, n_fft // 4, window=torch.hann_window(n_fft, dtype=x.dtype), return_complex=True)
    power = spec.abs().square().mean(dim=(0, 2))
    bin_hz = sample_rate / n_fft
    out = []
    k = 1
    while (c := round(k * spacing_hz / bin_hz)) + 11 <= n_fft // 2:
        near = torch.cat([power[c - 10 : c - 2], power[c + 3 : c + 11]])
        out.append(10.0 * math.log10(float(power[c - 1 : c + 2].max()) / max(float(near.median()), _TINY)))
        k += 1
    return out


def noise_floor_db(audio: torch.Tensor, sample_rate: int, frame_s: float = 0.05, floor: float = 1e-6) -> list[float]:
    """Per clip: how far (dB) its quietest ``frame_s`` frame sits below its loudest, by frame RMS (non-overlapping
    frames; digital silence counts as `floor` = -120 dBFS, so the value is at most 120 dB minus the clip's headroom).
    A hiss floor under speech shows as a small value (issue #17: the goal is >= 60 dB where the real clips are
    silent)."""
    x = _f64(audio).reshape(audio.shape[0], -1)
    n = max(1, int(round(frame_s * sample_rate)))
    frames = x.shape[1] // n
    if frames < 2:
        raise ValueError(f"noise floor: clips of {x.shape[1]} samples hold fewer than two {frame_s * 1000:g} ms frames")
    rms = x[:, : frames * n].reshape(x.shape[0], frames, n).pow(2).mean(-1).sqrt().clamp_min(floor)
    return (20.0 * (rms.max(dim=1).values / rms.min(dim=1).values).log10()).tolist()


def _spans(mask: torch.Tensor | None, n: int, t: int) -> list[tuple[int, int]]:
    """[start, end) of each sample's regenerated span (first to last True sample of its mask)."""
    if mask is None:
        return [(0, t)] * n
    m = mask.detach().cpu().bool().reshape(-1, t) if mask.dim() > 1 else mask.detach().cpu().bool().reshape(1, t)
    if m.shape[0] == 1:
        m = m.expand(n, t)
    spans = []
    for row in m:
        idx = row.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError("a mask row selects no samples")
        spans.append((int(idx[0]), int(idx[-1]) + 1))
    return spans


def snr_db(estimate: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
    """Mean per-clip SNR (dB) of `estimate` vs `target` [N,1,T] on the masked samples; capped at 120 dB.

    None (undefined) when a target is digital silence on its masked samples: there is no signal to compare with."""
    est, tgt = _f64(estimate).reshape(estimate.shape[0], -1), _f64(target).reshape(target.shape[0], -1)
    if est.shape != tgt.shape:
        raise ValueError(f"shape mismatch {tuple(est.shape)} vs {tuple(tgt.shape)}")
    if mask is None:
        w = torch.ones_like(tgt)
    else:
        w = mask.detach().cpu().to(torch.float64).reshape(-1, tgt.shape[1]).expand_as(tgt)
    signal = (w * tgt.pow(2)).sum(1)
    if not bool((signal > 0).all()):
        return None
    error = (w * (tgt - est).pow(2)).sum(1)
    floor = signal * 10.0 ** (-SNR_CAP_DB / 10.0) + 1e-30
    return float((10.0 * torch.log10((signal + 1e-30) / torch.maximum(error, floor))).mean())


def multi_resolution_stft_distance(
    estimate: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    fft_sizes: tuple[int, ...] = (256, 512, 1024),
) -> dict[str, float]:
    """Multi-resolution STFT distance: spectral convergence + mean |log-magnitude| difference, averaged over FFT sizes (Yamamoto et al. 2020, Parallel WaveGAN), on each clip's masked span."""
    est, tgt = _f64(estimate).reshape(estimate.shape[0], -1), _f64(target).reshape(target.shape[0], -1)
    n, t = tgt.shape
    sc_total, lm_total = 0.0, 0.0
    for (a, b), e_row, t_row in zip(_spans(mask, n, t), est, tgt):
        sc, lm = 0.0, 0.0
        for size in fft_sizes:
            win = torch.hann_window(size, dtype=torch.float64)
            kw: dict[str, Any] = {"n_fft": size, "hop_length": size // 4, "window": win, "center": True,
                                  "pad_mode": "constant", "return_complex": True}
            mag_e = torch.stft(e_row[a:b], **kw).abs()
            mag_t = torch.stft(t_row[a:b], **kw).abs()
            sc += float(torch.linalg.norm(mag_t - mag_e) / torch.linalg.norm(mag_t).clamp_min(1e-12))
            lm += float((mag_t.clamp_min(1e-7).log() - mag_e.clamp_min(1e-7).log()).abs().mean())
        sc_total += sc / len(fft_sizes)
        lm_total += lm / len(fft_sizes)
    sc_mean, lm_mean = sc_total / n, lm_total / n
    return {"mr_stft": sc_mean + lm_mean, "spectral_convergence": sc_mean, "log_stft_mag": lm_mean}


def _reference_audio(reference: AudioClips | torch.Tensor, sample_rate: int, to_rate: int) -> torch.Tensor:
    if isinstance(reference, torch.Tensor):
        return audio_at(reference, sample_rate, to_rate)
    return audio_at(reference.audio, reference.sample_rate, to_rate)


def evaluate_audio(
    samples: torch.Tensor,
    classifier: DigitClassifier,
    reference: AudioClips | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    sample_rate: int | None = None,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ndb_bins: int = 50,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float | None]:
    """SC09-protocol scores of generated `samples` [N,1,T] (Donahue et al. 2019; Kong et al. 2021; Goel et al. 2022).

    Always: `is`, `mis`. With `reference` (real clips; a tensor is taken at `sample_rate`): `fid`, `am`,
    `ndb_k`, `ndb`. With `labels` (the conditioning labels): `cond_acc`. With `target` (the original audio for
    inpainting) and optional `mask` (True on the regenerated span): `snr_db` (None when the target is silent
    there), `mr_stft`, `spectral_convergence`, `log_stft_mag`. `sample_rate` defaults to the classifier's.
    """
    sr = sample_rate or classifier.sample_rate
    logits, feats = classifier_outputs(classifier, audio_at(samples, sr, classifier.sample_rate), batch_size)
    probs = torch.softmax(logits.double(), dim=1)
    out: dict[str, float | None] = {
        "n": float(samples.shape[0]),
        "is": inception_score(probs),
        "mis": modified_inception_score(probs),
    }
    if reference is not None:
        ref_logits, ref_feats = classifier_outputs(classifier, _reference_audio(reference, sr, classifier.sample_rate),
                                                   batch_size)
        ref_probs = torch.softmax(ref_logits.double(), dim=1)
        out["fid"] = frechet_distance(ref_feats, feats)
        out["am"] = am_score(probs, ref_probs)
        out["ndb_k"], ndb = ndb_k(ref_feats, feats, k=ndb_bins, seed=seed)
        out["ndb"] = float(ndb)
    if labels is not None:
        out["cond_acc"] = conditional_accuracy(logits, labels)
    if target is not None:
        out["snr_db"] = snr_db(samples, target, mask)
        out.update(multi_resolution_stft_distance(samples, target, mask))
    return out


def reference_row(
    real_clips: AudioClips, classifier: DigitClassifier, train: AudioClips | None = None, **kwargs: Any
) -> dict[str, float]:
    """The real data's own SC09 scores: held-out `real_clips` scored as samples against the real `train` clips (FID, AM, NDB/K left out without `train`)."""
    return evaluate_audio(real_clips.audio, classifier, reference=train, labels=real_clips.labels,
                          sample_rate=real_clips.sample_rate, **kwargs)
