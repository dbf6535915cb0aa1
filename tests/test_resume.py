"""multidiff.resume: RNG capture / restore and the choice of the checkpoint to resume from (the Trainer's loop
around them is tested in test_training.py / test_checkpoint.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from multidiff import checkpoint as ck
from multidiff import resume
from multidiff.training import Trainer

from test_checkpoint import tiny_setup


def draws() -> tuple[float, float, float]:
    return float(torch.rand(())), float(np.random.rand()), random.random()


def test_rng_round_trip_is_loadable_weights_only(tmp_path: Path) -> None:
    resume.seed_everything(3)
    state = resume.capture_rng(torch.device("cpu"))
    first = draws()
    torch.save(state, tmp_path / "rng.pt")
    resume.seed_everything(99)
    resume.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    assert draws() == first


def test_resume_choice_uses_the_checkpoint_resolver(tmp_path: Path) -> None:
    out = tmp_path / "run"
    Trainer(*tiny_setup(steps=20), out, progress=False).fit()
    latest = out / "checkpoints" / "step_00000020"
    assert resume.find_resume_checkpoint(out, True) == latest
    # a run dir, its checkpoints dir or a checkpoint dir resolve as `checkpoint.resolve_checkpoint` does
    for given in (out, out / "checkpoints", latest, out / "checkpoints" / "step_00000010"):
        assert resume.find_resume_checkpoint(tmp_path / "other", given) == ck.resolve_checkpoint(given)
    assert resume.find_resume_checkpoint(tmp_path / "fresh", False) is None
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        resume.find_resume_checkpoint(out, False)
    with pytest.raises(ck.CheckpointError, match="not a weights file"):
        resume.find_resume_checkpoint(out, latest / ck.WEIGHTS_FILE)
    with pytest.raises(ck.CheckpointNotFoundError, match="not found"):
        resume.find_resume_checkpoint(out, tmp_path / "missing")
