"""Log-mel features, the SC09-protocol digit classifier and its scores on real FSDD clips."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from domains.audio.classifier import (
    DigitClassifier,
    _augment_mel_power,
    _augment_spectrogram,
    accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from domains.audio.data import AudioClips, load_fsdd
from domains.audio.features import LogMel, spectrogram_grid_png
from domains.audio.metrics import evaluate_audio, reference_row


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one intra-op thread: on a shared, oversubscribed 2-core box two threads cost several times the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fsdd(fsdd_dir: Path) -> dict[str, AudioClips]:
    """FSDD train and test splits at 16 kHz, 1 s."""
    return {"train": load_fsdd(fsdd_dir, "train"), "test": load_fsdd(fsdd_dir, "test")}


def _per_class_subset(clips: AudioClips, per_class: int, seed: int = 0) -> AudioClips:
    """`per_class` random clips of each label (all speakers mixed)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(len(clips.class_names)):
        idx = (clips.labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return clips.subset(torch.cat(picks))


def _noise_like(clips: AudioClips, seed: int = 0) -> torch.Tensor:
    """White noise with each real clip's RMS."""
    noise = torch.randn(clips.audio.shape, generator=torch.Generator().manual_seed(seed))
    return noise * clips.audio.pow(2).mean(-1, keepdim=True).sqrt()


# ---------------------------------------------------------------- features


def test_logmel_shape_and_tone_position() -> None:
    sr = 16000
    t = torch.arange(sr) / sr
    tones = torch.stack([torch.sin(2 * math.pi * f * t) for f in (300.0, 3000.0)]).unsqueeze(1)
    mel = LogMel(sr, n_fft=1024, hop_length=256, n_mels=64)
    out = mel(tones)
    assert out.shape == (2, 64, sr // 256 + 1)
    peak_bins = out.mean(-1).argmax(-1)
    assert peak_bins[0] < peak_bins[1]  # the higher tone lands in a higher mel band
    silent = mel(torch.zeros(1, 1, sr))
    assert torch.allclose(silent, torch.full_like(silent, math.log(mel.floor)))


def test_spectrogram_grid_png_writes_an_image(tmp_path: Path) -> None:
    audio = 0.1 * torch.randn(3, 1, 8000)
    path = spectrogram_grid_png(audio, 16000, tmp_path / "grid.png", titles=["a", "b", "c"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError):
        spectrogram_grid_png(audio, 16000, tmp_path / "bad.png", titles=["only one"])


# ---------------------------------------------------------------- model


def test_classifier_shapes_and_gain_invariance() -> None:
    torch.manual_seed(0)
    clf = DigitClassifier(num_classes=10).eval()
    x = 0.05 * torch.randn(3, 1, 16000)
    with torch.no_grad():
        logits, feats = clf(x), clf.features(x)
        assert logits.shape == (3, 10) and feats.shape == (3, clf.config["embed_dim"])
        assert torch.allclose(clf(4.0 * x), logits, atol=1e-4)  # peak-normalised input
        assert torch.allclose(clf(1e-2 * x), logits, atol=1e-4)
        assert torch.allclose(clf.spectrogram(torch.zeros(1, 1, 16000)), -torch.ones(1, 1, 64, 63), atol=1e-5)
        assert clf(x[:, :, :12000]).shape == (3, 10)  # any length works (global pooling)


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = DigitClassifier(num_classes=10, n_mels=48, channels=(8, 16, 32)).eval()
    path = save_classifier(clf, tmp_path / "clf.safetensors", {"dataset": "fsdd", "test_acc": 0.5})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # plain safetensors: JSON config in the header, no pickle
        assert json.loads(f.metadata()["config"])["channels"] == [8, 16, 32]
    back = load_classifier(path)
    assert back.config == clf.config
    assert back.meta["dataset"] == "fsdd" and back.meta["test_acc"] == 0.5
    x = 0.1 * torch.randn(2, 1, 16000)
    with torch.no_grad():
        assert torch.equal(back(x), clf(x))
    bad = tmp_path / "other.safetensors"

    save_file({"w": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a"):
        load_classifier(bad)


def test_augmentations_keep_shapes_perturb_and_are_seeded() -> None:
    torch.manual_seed(0)
    clf = DigitClassifier()
    power = clf.logmel.mel(0.1 * torch.randn(4, 16000))
    noisy = _augment_mel_power(power, torch.ones(power.shape[1]), torch.Generator().manual_seed(0))
    assert noisy.shape == power.shape and (noisy >= power * 10 ** -1.2 - 1e-12).all()
    spec = clf.normalize(torch.log(power.clamp_min(1e-5)))
    a = _augment_spectrogram(spec, torch.Generator().manual_seed(1))
    b = _augment_spectrogram(spec, torch.Generator().manual_seed(1))
    assert a.shape == spec.shape and torch.equal(a, b) and not torch.allclose(a, spec)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6
    silence = -torch.ones(2, 1, 64, 63)  # all-silent input stays silent under shift, stretch and warp
    assert torch.allclose(_augment_spectrogram(silence, torch.Generator().manual_seed(2)), silence)


# ---------------------------------------------------------------- training on FSDD


@pytest.fixture(scope="module")
def quick_model(fsdd: dict[str, AudioClips]) -> DigitClassifier:
    """A classifier trained briefly (no augmentation, to converge fast) on a 600-clip FSDD subset."""
    small = _per_class_subset(fsdd["train"], 60)
    with _one_thread():
        model, history = train_classifier(small, None, epochs=4, batch_size=32, lr=3e-3, seed=0, progress=False,
                                          augment=False)
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    return model


def test_quick_training_beats_chance(quick_model: DigitClassifier, fsdd: dict[str, AudioClips]) -> None:
    acc = accuracy(quick_model, fsdd["test"])
    assert acc > 0.6, f"FSDD test accuracy {acc:.3f} after a short training run"


def test_real_clips_score_better_than_noise_quick(quick_model: DigitClassifier,
                                                  fsdd: dict[str, AudioClips]) -> None:
    test = fsdd["test"]
    real = reference_row(test, quick_model)
    noise = evaluate_audio(_noise_like(test), quick_model, labels=test.labels)
    assert real["cond_acc"] > 0.6 and noise["cond_acc"] < 0.3
    assert real["is"] > 3.0 and real["is"] > 2 * noise["is"]


@pytest.fixture(scope="module")
def full_model(fsdd: dict[str, AudioClips]) -> tuple[DigitClassifier, float]:
    """The full recipe on FSDD train; returns (model, training seconds)."""
    start = time.perf_counter()
    with _one_thread():
        model, _ = train_classifier(fsdd["train"], None, seed=0, progress=False)
    return model, time.perf_counter() - start


@pytest.mark.slow
def test_full_recipe_reaches_97_percent(full_model: tuple[DigitClassifier, float], fsdd: dict[str, AudioClips],
                                        tmp_path: Path) -> None:
    model, seconds = full_model
    acc = accuracy(model, fsdd["test"])
    print(f"FSDD test accuracy {acc:.4f}, training {seconds:.0f} s")
    assert acc >= 0.97
    back = load_classifier(save_classifier(model, tmp_path / "fsdd.safetensors", {"test_acc": acc}))
    assert accuracy(back, fsdd["test"]) == acc


@pytest.mark.slow
def test_sc09_scores_of_real_clips_and_noise(full_model: tuple[DigitClassifier, float],
                                             fsdd: dict[str, AudioClips]) -> None:
    model, _ = full_model
    test, train = fsdd["test"], fsdd["train"]
    real = reference_row(test, model, train)
    noise = evaluate_audio(_noise_like(test), model, reference=train, labels=test.labels)
    print("real", real, "\nnoise", noise)
    assert real["is"] > 8.5 and real["cond_acc"] >= 0.95
    assert noise["cond_acc"] < 0.3 and (noise["is"] < 3.0 or noise["fid"] > 10 * real["fid"])
    assert noise["fid"] > 5 * real["fid"] and noise["ndb_k"] > real["ndb_k"]
