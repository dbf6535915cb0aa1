"""Progressive distillation (``multidiff distill``): a toy student sampled in 2 DDIM steps is close to its guided
teacher on the refined grid, it is an ordinary checkpoint, and bad input is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multidiff import pipeline
from multidiff.distill import distill, refine_grid
from multidiff.registry import get_domain
from multidiff.samplers import get_sampler, prior
from multidiff.schedules import get_schedule, make_grid


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    dom = get_domain("toy")
    cfg = pipeline.load_run_config(dom, None, ["train.steps=500", "train.ckpt_every=500", "model.hidden=64"])
    pipeline.train(dom, cfg, run, device="cpu", progress=False)
    return run


def test_refine_grid_nests_and_keeps_the_last_step() -> None:
    sch = get_schedule("cosine")
    ts = make_grid(sch, 2, "karras")
    fine = refine_grid(sch, ts)
    assert fine.numel() == 4 and torch.equal(fine[[0, 2, 3]], ts)  # the interval to sigma = 0 is not split
    lam = sch.logsnr(fine[:3])
    assert torch.allclose(lam[1], 0.5 * (lam[0] + lam[2]))


def test_two_step_student_is_close_to_its_guided_teacher(teacher: Path, tmp_path: Path) -> None:
    model = pipeline.load_model(teacher)
    path = distill(model, 2, tmp_path / "student", rounds=3, iters=150, lr=1e-3, batch_size=256, guidance=2.0)
    student = pipeline.load_model(tmp_path / "student")  # an ordinary checkpoint
    assert path.is_dir() and student.cfg.sample.steps == 2 and student.cfg.sample.sampler == "ddim"
    assert student.cfg.sample.guidance == 1.0
    for n in (5, 3):  # each round's student is kept as an ordinary checkpoint of its own step count (9 -> 5 -> 3 -> 2)
        mid = pipeline.load_model(tmp_path / "student" / "rounds" / f"{n}-step")
        assert mid.cfg.sample.steps == n and mid.cfg.sample.sampler == "ddim"
    assert sorted(p.name for p in (tmp_path / "student" / "rounds").iterdir()) == ["3-step", "5-step"]
    sch = model.denoiser.schedule
    labels = torch.arange(1000) % 8
    ts2 = make_grid(sch, 2, "karras")
    fine = ts2
    for _ in range(3):
        fine = refine_grid(sch, fine)
    x = prior(sch, ts2[0], torch.zeros(1000, 2), None, torch.Generator().manual_seed(5))
    from multidiff.guidance import ClassifierFreeGuidance

    guided = ClassifierFreeGuidance(lambda xx, t, c: model.denoiser(xx, t, c), {"label": labels}, 2.0)
    with torch.no_grad():
        ref = get_sampler("ddim")(guided, x, fine, sch)  # the teacher on its 9-interval grid, 2 passes per step
        teacher2 = get_sampler("ddim")(guided, x, ts2, sch)
        out = get_sampler("ddim")(lambda xx, t: student.denoiser(xx, t, {"label": labels}), x, ts2, sch)
    err = float((out - ref).pow(2).sum(1).sqrt().mean())
    base = float((teacher2 - ref).pow(2).sum(1).sqrt().mean())
    assert err < 0.5 * base, (err, base)
    dom = get_domain("toy")
    assert dom.metrics({"x": out, "label": labels}, model.cfg.data)["conditional_accuracy"] > 0.95


def test_bad_input_is_named(teacher: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    model = pipeline.load_model(teacher)
    with pytest.raises(ValueError, match="--steps"):
        distill(model, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="--grid: unknown grid 'karas'"):
        distill(model, 2, tmp_path / "x", grid="karas")
    env = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "multidiff.cli", "distill", "audio", "--checkpoint", str(teacher),
                        "--steps", "2", "--out", str(tmp_path / "y")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0 and "for domain 'toy', not 'audio'" in p.stderr


def _student_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _distill_meta(path: Path) -> dict:
    import json

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["distill"])


def test_max_minutes_bounds_each_round_and_is_recorded(teacher: Path, tmp_path: Path) -> None:
    import time

    model = pipeline.load_model(teacher)
    t0 = time.monotonic()
    path = distill(model, 2, tmp_path / "s", rounds=2, iters=10**7, batch_size=16, max_minutes=0.02)
    took = time.monotonic() - t0
    meta = _distill_meta(path)
    assert len(meta["iters_done"]) == 2 and all(1 <= n < 10**7 for n in meta["iters_done"]), meta
    assert took < 30 and meta["minutes"] < 0.5, (took, meta)
    assert pipeline.load_model(tmp_path / "s").cfg.sample.steps == 2
    with pytest.raises(ValueError, match="--max-minutes"):
        distill(model, 2, tmp_path / "x", max_minutes=0)


def test_the_teacher_is_guided_only_in_the_checkpoint_guidance_interval(teacher: Path, tmp_path: Path) -> None:
    """An interval that holds none of the grid's times leaves the teacher plain conditional: the student is bit for
    bit the one distilled at guidance 1, and a different one without the interval."""
    kw = dict(rounds=1, iters=3, batch_size=16, lr=1e-3, seed=3)
    plain = _student_state(distill(pipeline.load_model(teacher), 2, tmp_path / "plain", guidance=1.0, **kw))
    guided = _student_state(distill(pipeline.load_model(teacher), 2, tmp_path / "guided", guidance=3.0, **kw))
    model = pipeline.load_model(teacher)
    model.cfg.sample.guidance_interval = (0.0, 1e-6)  # grid times are >= t_min = 1e-4
    path = distill(model, 2, tmp_path / "outside", guidance=3.0, **kw)
    outside = _student_state(path)
    assert _distill_meta(path)["guidance_interval"] == [0.0, 1e-6]
    assert all(torch.equal(outside[k], plain[k]) for k in plain)
    assert any(not torch.equal(guided[k], plain[k]) for k in plain)
