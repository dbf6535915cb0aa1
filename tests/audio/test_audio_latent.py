"""Latent audio diffusion (issue #17): the waveform autoencoder, its loss, the noise-floor metric, and a latent model
trained, sampled, inpainted and evaluated through the CLI, with the bad-input errors of a wrong autoencoder."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from domains.audio.autoencoder import AudioAutoencoder, AutoencoderLoss, mr_stft_loss
from domains.audio.latent import LatentDataset, find_autoencoder
from domains.audio.metrics import noise_floor_db
from tests.audio.test_audio_domain import SR, cli, folder, last_json, squash  # noqa: F401  (folder is a fixture)

TINY_AE = ["model.ae_channels=[4,4,8,8,8]", "model.latent_channels=4", "model.ae_segment=4096", "train.batch_size=4",
           "train.log_every=1", "train.ckpt_every=3", "data.max_clips=24"]
TINY_LATENT = ["model.channels=8", "model.blocks=[1,1,1]", "model.heads=2", "data.max_clips=24", "train.batch_size=8",
               "train.ckpt_every=3", "train.log_every=1"]


def test_shapes_and_receptive_field_match_autograd() -> None:
    """Encode divides the length by the product of the strides, decode restores it, and the input span that one
    latent frame depends on (non-zero gradient, float64) is exactly `receptive_field` samples wide."""
    torch.manual_seed(0)
    ae = AudioAutoencoder((4, 4, 4, 4, 4), (2, 4, 4, 2), latent_channels=3).double()
    assert ae.compression == 64
    x = torch.randn(2, 1, 64 * 80, dtype=torch.float64, requires_grad=True)
    z = ae.encode(x)
    assert z.shape == (2, 3, 80)
    assert ae.decode(z).shape == (2, 1, 64 * 80)
    z[0, :, 40].sum().backward()
    support = torch.nonzero(x.grad[0, 0]).flatten()
    assert int(support.max() - support.min() + 1) == ae.receptive_field


def test_mr_stft_loss_closed_forms() -> None:
    """Identical signals: 0. Twice the target: spectral convergence ||2X - X|| / ||X|| = 1 and the log-magnitude term
    log 2 (eps = 1e-5 is negligible for unit-variance noise), so the loss is 1 + ln 2."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8192)
    assert float(mr_stft_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(mr_stft_loss(2 * x, x)) == pytest.approx(1.0 + math.log(2.0), abs=2e-3)


def test_noise_floor_closed_form_and_digital_silence() -> None:
    """A clip whose loud 50 ms frames have RMS a and one quiet frame RMS b reads 20 log10(a / b); digital silence
    counts as -120 dBFS."""
    n = int(0.05 * SR)
    loud = 0.5 * np.sqrt(2) * np.sin(2 * np.pi * 400 * np.arange(n) / SR)  # RMS 0.5 over whole periods
    quiet = 1e-3 * np.sign(np.sin(2 * np.pi * 100 * np.arange(n) / SR) + 1e-9)  # RMS 1e-3
    clip = torch.tensor(np.concatenate([loud, quiet, loud, np.zeros(n)]))[None, None]
    hiss = torch.tensor(np.concatenate([loud, quiet, loud, quiet]))[None, None]
    got = noise_floor_db(torch.cat([clip, hiss]), SR)
    assert got[0] == pytest.approx(20 * math.log10(0.5 / 1e-6), abs=0.01)
    assert got[1] == pytest.approx(20 * math.log10(0.5 / 1e-3), abs=0.01)


def test_bad_autoencoder_settings_are_named() -> None:
    with pytest.raises(ValueError, match="ae_strides must be even"):
        AudioAutoencoder((4, 4, 4), (2, 3))
    with pytest.raises(ValueError, match="one entry more than model.ae_strides"):
        AudioAutoencoder((4, 4), (2, 4))
    ae = AudioAutoencoder((4, 4, 4, 4, 4), (2, 4, 4, 2))
    with pytest.raises(ValueError, match=r"shorter than the autoencoder's receptive field \(1336 samples"):
        AutoencoderLoss(ae, segment=640)
    with pytest.raises(ValueError, match="not a multiple of the autoencoder's compression 64"):
        ae.encode(torch.zeros(1, 1, 2000))
    with pytest.raises(FileNotFoundError, match="data.latent='no/such/ae.safetensors': autoencoder not found"):
        find_autoencoder("no/such/ae.safetensors")


def test_latent_dataset_shift_fills_with_silence() -> None:
    z = torch.arange(12.0).view(2, 6) + 1.0
    silence = torch.tensor([[-1.0], [-2.0]])
    ds = LatentDataset(z[None], torch.tensor([3]), max_shift_frames=2, silence=silence)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        item, label = ds[0]
        assert int(label) == 3
        for shift in range(-2, 3):
            want = torch.cat([silence.expand(2, max(shift, 0)), z[:, max(-shift, 0): 6 - max(shift, 0)],
                              silence.expand(2, max(-shift, 0))], dim=1)
            if torch.equal(item, want):
                seen.add(shift)
    assert seen == {-2, -1, 0, 1, 2}


@pytest.fixture(scope="module")
def autoencoder(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("ae") / "run"
    res = last_json(cli("train", "audio", "--config", "autoencoder", "data.source=folder", f"data.root={folder}",
                        "train.steps=3", *TINY_AE, "--out", str(out), "--no-progress"))
    assert res["step"] == 3
    return out


@pytest.fixture(scope="module")
def latent_run(autoencoder: Path, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("latent") / "run"
    res = last_json(cli("train", "audio", "--config", "fast", "data.source=folder", f"data.root={folder}",
                        f"data.latent={autoencoder}", "train.steps=3", *TINY_LATENT, "--out", str(out),
                        "--no-progress"))
    assert res["step"] == 3
    return out


def test_latent_model_trains_on_normalised_latents(latent_run: Path, autoencoder: Path) -> None:
    from domains.audio.domain import AudioDomain
    from multidiff.pipeline import load_run

    run = load_run(latent_run)
    stats = run.cfg.data.latent_stats
    assert stats["channels"] == 4 and stats["compression"] == 64 and stats["sample_rate"] == SR
    ds = AudioDomain().build_dataset(run.cfg, "valid")
    z = ds.latents
    assert z.shape[1:] == (4, SR // 64)
    # the statistics are those of the training clips' latents: the normalised ones have mean ~0 and std ~1
    assert z.mean(dim=(0, 2)).abs().max() < 0.5 and ((z.std(dim=(0, 2)) - 1).abs() < 0.5).all()


def test_sample_decodes_latents_to_wav_and_inpaints_bit_exact(latent_run: Path, folder: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    res = last_json(cli("sample", "audio", "--checkpoint", str(latent_run), "--num", "3", "--steps", "3",
                        "--out", str(tmp_path / "s")))
    wavs = sorted((tmp_path / "s").glob("sample_*.wav"))
    assert len(wavs) == 3
    audio, sr = sf.read(wavs[0])
    assert sr == SR and audio.shape == (SR,)
    assert "noise_floor_db" in res["metrics"] and res["metrics"]["count"] == 3
    src = folder / "3" / "clip2.wav"  # 0.7 s: padded to the model's 1 s
    res = last_json(cli("sample", "audio", "--checkpoint", str(latent_run), "--num", "2", "--steps", "3", "--label",
                        "3", "--inpaint", str(src), "--mask", "0.2:0.4", "--out", str(tmp_path / "fill")))
    assert res["metrics"]["inpaint_kept_max_abs_diff"] == 0.0
    original, _ = sf.read(src, dtype="float32")
    for wav in sorted((tmp_path / "fill").glob("sample_*.wav")):
        got, _ = sf.read(wav, dtype="float32")
        keep = np.ones(SR, dtype=bool)
        keep[int(0.2 * SR): int(0.4 * SR)] = False
        ref = np.zeros(SR, dtype=np.float32)
        ref[: original.size] = original
        assert np.array_equal(got[keep], ref[keep])
        assert not np.array_equal(got[~keep], ref[~keep])


def test_a_different_autoencoder_at_the_path_is_refused(latent_run: Path, autoencoder: Path, folder: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    other = tmp_path / "other"
    last_json(cli("train", "audio", "--config", "autoencoder", "data.source=folder", f"data.root={folder}",
                  "train.steps=2", *TINY_AE, "model.ae_strides=[2,4,4,4]", "--out", str(other), "--no-progress"))
    saved = tmp_path / "saved"
    shutil.copytree(autoencoder, saved)
    try:
        shutil.rmtree(autoencoder)
        shutil.copytree(other, autoencoder)
        proc = cli("sample", "audio", "--checkpoint", str(latent_run), "--num", "1", "--steps", "2",
                   "--out", str(tmp_path / "s"))
        assert proc.returncode != 0
        err = squash(proc.stderr)
        assert "compressionis128" in err and "data.latent_stats.compression" in err and squash(str(autoencoder)) in err
        shutil.rmtree(autoencoder)
        proc = cli("sample", "audio", "--checkpoint", str(latent_run), "--num", "1", "--steps", "2",
                   "--out", str(tmp_path / "s2"))
        assert proc.returncode != 0 and "autoencodernotfound" in squash(proc.stderr)
    finally:
        if autoencoder.exists():
            shutil.rmtree(autoencoder)
        shutil.copytree(saved, autoencoder)


def test_autoencoder_recipe_refuses_clips_shorter_than_its_receptive_field(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    proc = cli("train", "audio", "--config", "autoencoder", "data.source=folder", f"data.root={folder}",
               "data.seconds=0.064", "model.ae_segment=1024", *TINY_AE[:2], "train.steps=1", "--out",
               str(tmp_path / "r"), "--no-progress")
    assert proc.returncode != 0
    assert "receptivefield" in squash(proc.stderr), proc.stderr[-2000:]


def test_latent_model_with_a_classifier_as_autoencoder_is_refused(tmp_path: Path) -> None:
    proc = cli("train", "audio", "--config", "fast", "data.latent=data/checkpoints/audio_classifier.safetensors",
               "train.steps=1", *TINY_LATENT, "--out", str(tmp_path / "r"), "--no-progress")
    assert proc.returncode != 0
    assert "audio_classifier.safetensors" in squash(proc.stderr), proc.stderr[-2000:]
