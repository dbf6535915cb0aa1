"""The checkpoints shipped in data/checkpoints load from their embedded config alone and sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multidiff import pipeline

CKPTS = Path(__file__).resolve().parents[1] / "data" / "checkpoints"


@pytest.mark.parametrize("domain", ["audio", "molecules"])
def test_shipped_checkpoint_samples(domain: str, tmp_path: Path) -> None:
    path = CKPTS / f"{domain}.safetensors"
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
    from domains.molecules.properties import load_predictor, property_baselines

    path = CKPTS / "molecules_alpha_predictor.safetensors"
    assert path.stat().st_size <= 20 * 2**20
    predictor = load_predictor(path)
    assert predictor.names == ["alpha"]
    qm9 = load_qm9(progress=False)
    rows = property_baselines(predictor, qm9, _resolve_indices(len(qm9), "generator"), num=300)["alpha"]
    assert rows["qm9"] < 0.5 * rows["n_atoms"] < 0.5 * rows["shuffled"]
