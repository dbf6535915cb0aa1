"""The checkpoints shipped in data/checkpoints load from their embedded config alone, sample, and sample well: quality
above a floor on a small sample (far above a random-weight model, well below the published numbers, which need 1,000
samples), so that a broken sampler, preconditioning, decoder or checkpoint loader fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multidiff import pipeline

CKPTS = Path(__file__).resolve().parents[1] / "data" / "checkpoints"


@pytest.mark.parametrize("domain,name", [("audio", "audio"), ("audio", "audio_waveform"), ("molecules", "molecules")])
def test_shipped_checkpoint_samples(domain: str, name: str, tmp_path: Path) -> None:
    path = CKPTS / f"{name}.safetensors"
    assert path.is_file(), f"{path} is documented in the README as shipped"
    assert path.stat().st_size <= 20 * 2**20
    model = pipeline.load_model(path)
    assert model.domain.name == domain
    request = model.domain.request(model.cfg, 2, {}, seed=0)
    x = pipeline.generate(model, request, sampler="dpmpp_2m", steps=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == request.like.shape and torch.isfinite(x).all()
    files = model.domain.write(model.domain.decode(x, request), tmp_path)
    assert all(f.is_file() for f in files)


def test_shipped_classifier_loads() -> None:
    from domains.audio.domain import load_any_classifier

    clf = load_any_classifier(CKPTS / "audio_classifier.safetensors")
    logits = clf(torch.zeros(1, 1, 16000))
    assert logits.shape == (1, 10)


def test_shipped_alpha_predictor_beats_shuffled_labels() -> None:
    """The shipped property predictor is far better than chance on molecules it never saw (generator half)."""
    from domains.molecules.data import _resolve_indices, load_qm9
    from domains.molecules.domain import MoleculesDomain
    from domains.molecules.properties import property_baselines

    path = CKPTS / "molecules_alpha_predictor.safetensors"
    assert path.stat().st_size <= 20 * 2**20
    predictor = MoleculesDomain().load_predictor(path)
    assert predictor.names == ["alpha"]
    qm9 = load_qm9(progress=False)
    rows = property_baselines(predictor, qm9, _resolve_indices(len(qm9), "generator"), num=300)["alpha"]
    assert rows["qm9"] < 0.5 * rows["n_atoms"] < 0.5 * rows["shuffled"]


# --- quality floors on a small sample (published numbers: README.md, data/checkpoints/README.md) ---------------------
#
# molecules.safetensors, its default sampler (heun, 15 steps = 29 evaluations), 64 molecules, seed 0 (one thread,
#   ~5 s CPU): shipped weights: atom stability 0.972, molecule stability 0.688, validity 0.875 (published on 1,000:
#   0.971 / 0.673 / 0.891); the same network with random weights (torch.manual_seed(0), the recipe's initialisation):
#   atom stability 0.073, molecule stability 0, but validity 0.78 (scattered atoms make small valid fragments), so
#   validity is no floor.
# audio.safetensors (latent diffusion, the default since issue #17) and audio_waveform.safetensors (the raw-waveform
#   model) judged by audio_classifier.safetensors, one clip per digit (10), dpmpp_2m 10 steps with the files' guidance
#   3 for t <= 0.8 (~3 s CPU each): conditional accuracy 0.7 (latent: the judge hears its 1 and 2 as 5 and 3 in these seeds) and
#   1.0 (waveform); published on 160 clips at
#   25 steps: 0.931 and 0.975. Chance is 0.1; a random-weight model scores 0.0.
MOL_ATOM_STABILITY_FLOOR = 0.88
MOL_STABILITY_FLOOR = 0.45  # more than 28 of 64 molecules entirely stable (binomial at 0.673: ~43 +- 3.8)
AUDIO_ACCURACY_FLOOR = 0.6


def test_shipped_molecules_model_is_stable_above_a_floor(one_thread) -> None:
    from domains.molecules.metrics import evaluate_molecules

    model = pipeline.load_model(CKPTS / "molecules.safetensors")
    settings = pipeline.sampler_settings(model)
    assert (settings.sampler, settings.steps) == ("heun", 15)  # the exported default the README quotes
    samples = pipeline.generate_samples(model, 64, {}, settings, seed=0)
    metrics = evaluate_molecules(samples.molecules)
    assert metrics["num_molecules"] == 64
    assert metrics["atom_stability"] > MOL_ATOM_STABILITY_FLOOR, metrics
    assert metrics["mol_stability"] > MOL_STABILITY_FLOOR, metrics


@pytest.mark.parametrize("name,latent", [("audio", True), ("audio_waveform", False)])
def test_shipped_audio_model_says_the_digit_it_was_asked_for(one_thread, name: str, latent: bool) -> None:
    from domains.audio.domain import classifier_class_names, load_any_classifier
    from domains.audio.metrics import conditional_accuracy

    model = pipeline.load_model(CKPTS / f"{name}.safetensors")
    assert bool(model.cfg.data.latent) == latent  # the default audio model is the latent one (README)
    judge = load_any_classifier(CKPTS / "audio_classifier.safetensors")
    assert classifier_class_names(judge) == list(model.cfg.data.class_names)  # label k means the same digit to both
    settings = pipeline.sampler_settings(model, steps=10)
    assert settings.guidance == 3.0 and settings.guidance_interval == (0.0, 0.8)  # the exported defaults
    clips, labels = [], []
    for digit in range(10):
        s = pipeline.generate_samples(model, 1, {"label": str(digit)}, settings, seed=digit)
        clips.append(s["audio"])
        labels.append(s["labels"])
    audio, labels = torch.cat(clips), torch.cat(labels)
    assert labels.tolist() == list(range(10)) and audio.shape == (10, 1, 16000)
    assert audio.abs().amax(-1).min() > 0.05  # no silent clip
    with torch.no_grad():
        logits = judge(audio)
    accuracy = conditional_accuracy(logits, labels)
    assert accuracy >= AUDIO_ACCURACY_FLOOR, (accuracy, logits.argmax(1).tolist())


# audio_autoencoder.safetensors on the first 40 held-out espeak clips (one thread, ~5 s): judge accuracy on the
#   reconstructions 0.975, noise floor 71.4 dB, MR-STFT 1.24 (published on all 480: 0.938 / 71.4 dB / 1.22); the
#   40-minute autoencoder shipped before it: 0.70 / 58.3 dB / 1.50, which these floors reject.
AE_ACCURACY_FLOOR, AE_NOISE_FLOOR_DB, AE_MR_STFT_CEILING = 0.85, 64.0, 1.35


def test_shipped_autoencoder_reconstructs_held_out_digits(one_thread) -> None:
    import dataclasses
    import warnings

    from domains.audio.domain import load_any_classifier, load_clips
    from domains.audio.latent import encode_clips, load_autoencoder
    from domains.audio.metrics import conditional_accuracy, multi_resolution_stft_distance, noise_floor_db

    path = CKPTS / "audio_autoencoder.safetensors"
    assert path.stat().st_size <= 20 * 2**20
    run = pipeline.load_run(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clips = load_clips(dataclasses.replace(run.cfg.data, max_clips=40), "test")
    ae = load_autoencoder(str(path))
    assert (ae.compression, ae.latent_channels) == (64, 16)  # what configs/audio/fast.yaml and the README say
    with torch.no_grad():
        y = ae.decode(encode_clips(ae, clips.audio)).clamp(-1, 1)
        accuracy = conditional_accuracy(load_any_classifier(CKPTS / "audio_classifier.safetensors")(y), clips.labels)
    assert y.shape == clips.audio.shape
    assert accuracy >= AE_ACCURACY_FLOOR
    assert float(torch.tensor(noise_floor_db(y, clips.sample_rate)).median()) >= AE_NOISE_FLOOR_DB
    assert multi_resolution_stft_distance(y, clips.audio)["mr_stft"] <= AE_MR_STFT_CEILING
