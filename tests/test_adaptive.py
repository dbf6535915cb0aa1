"""The error-controlled sampler (adaptive DPM-Solver-23) on the analytic mixture: its error against a converged
solution of the same probability-flow ODE stays below the tolerance, it needs fewer NFE than a fixed Karras grid of
equal error, it reports its NFE, handles categorical parts and refuses bad settings."""

from __future__ import annotations

import pytest
import torch

from multidiff.analytic import GaussianMixture
from multidiff.samplers import StepInfo, get_sampler, prior, sample
from multidiff.schedules import get_schedule, make_grid


def _mixture() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([[-3.0, 0.0], [2.0, 2.0], [1.5, -2.5]]),
                           torch.tensor([0.5, 0.7, 0.4]))


@pytest.fixture(scope="module")
def converged() -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, the 1000-step Heun solution from it): converged to ~1e-5 (2000 steps differ by 9e-6 RMS)."""
    gm, sch = _mixture(), get_schedule("cosine")
    ts = make_grid(sch, 1000, "karras")
    x = prior(sch, ts[0], torch.zeros(500, 2, dtype=torch.float64), None, torch.Generator().manual_seed(7))
    return x, get_sampler("heun")(gm.denoiser(sch), x, ts, sch)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@pytest.mark.parametrize("tol", [3e-3, 1e-3, 1e-4])
def test_error_against_a_converged_solution_is_below_the_tolerance(tol: float, converged) -> None:
    x, ref = converged
    gm, sch = _mixture(), get_schedule("cosine")
    stats: dict[str, int] = {}
    out = get_sampler("adaptive")(gm.denoiser(sch), x, make_grid(sch, 25, "karras"), sch, rtol=tol, atol=tol, stats=stats)
    assert _rms(out, ref) < tol  # measured 0.81 / 0.77 / 0.75 x tol
    assert float(((out - ref) ** 2).mean(1).sqrt().max()) < 15 * tol  # worst of 500 samples: 12 / 11 / 11 x tol
    assert stats["nfe"] == 3 * (stats["accepted"] - 1) + 2 * stats["rejected"] + 1


def test_fewer_nfe_than_a_fixed_grid_of_equal_error(converged) -> None:
    x, ref = converged
    gm, sch = _mixture(), get_schedule("cosine")
    stats: dict[str, int] = {}
    out = get_sampler("adaptive")(gm.denoiser(sch), x, make_grid(sch, 25, "karras"), sch, rtol=1e-3, atol=1e-3, stats=stats)
    err = _rms(out, ref)
    # measured: adaptive 118 NFE at RMS 7.7e-4; Heun needs 160 steps (319 NFE, 4.5e-4; 120 steps: 8.1e-4), DPM-Solver++(2M)
    # is at 2.4e-3 after 160 steps
    matched = {}
    for name in ("heun", "dpmpp_2m"):  # the cheapest fixed Karras grid as accurate needs more NFE (or none is)
        for steps in (20, 40, 80, 120, 160):
            nfe_fixed = 2 * steps - 1 if name == "heun" else steps
            fixed_err = _rms(get_sampler(name)(gm.denoiser(sch), x, make_grid(sch, steps, "karras"), sch), ref)
            if fixed_err <= err:
                assert nfe_fixed > stats["nfe"], (name, steps, fixed_err, err, stats)
                matched[name] = nfe_fixed
                break
    assert "heun" in matched


def test_reports_nfe_through_the_callback_and_ends_at_t0() -> None:
    gm, sch = _mixture(), get_schedule("cosine")
    calls = 0

    def den(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return gm.denoiser(sch)(x, t)

    seen: list[StepInfo] = []
    stats: dict[str, int] = {}
    sample(den, torch.zeros(64, 2, dtype=torch.float64), sch, sampler="adaptive", steps=10, callback=seen.append,
           stats=stats, generator=torch.Generator().manual_seed(0))
    assert seen[-1].nfe == calls == stats["nfe"] and seen[-1].t == 0.0
    assert [s.i for s in seen] == list(range(len(seen))) and all(a.nfe < b.nfe for a, b in zip(seen, seen[1:]))


def test_flow_schedule_from_t1_and_a_positive_end() -> None:
    """The uniform grid starts at alpha = 0 (one DDIM step first); a grid ending at sigma > 0 returns x there."""
    gm, sch = _mixture(), get_schedule("flow")
    out = sample(gm.denoiser(sch), torch.zeros(2000, 2, dtype=torch.float64), sch, sampler="adaptive", steps=30,
                 grid="uniform", generator=torch.Generator().manual_seed(1))
    comp = ((out[:, None] - gm.means[None]) ** 2).sum(-1).argmin(1)
    assert abs(float((comp == 1).double().mean()) - 0.5) < 0.05
    ts = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    x = prior(sch, ts[0], torch.zeros(8, 2, dtype=torch.float64), None, torch.Generator().manual_seed(2))
    out = get_sampler("adaptive")(gm.denoiser(sch), x, ts, sch)
    assert torch.isfinite(out).all() and out.std() > 0.1  # still noisy at t = 0.2


def test_bad_settings_are_named() -> None:
    gm, sch = _mixture(), get_schedule("cosine")
    ts = make_grid(sch, 10)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="rtol, atol"):
        get_sampler("adaptive")(gm.denoiser(sch), x, ts, sch, rtol=-1.0)
    with pytest.raises(ValueError, match="rtol, atol"):
        get_sampler("adaptive")(gm.denoiser(sch), x, ts, sch, rtol=0.0, atol=0.0)
    with pytest.raises(FloatingPointError, match="max_nfe=5"):
        get_sampler("adaptive")(gm.denoiser(sch), x * 80, ts, sch, rtol=1e-8, atol=1e-8, max_nfe=5)
    from multidiff.samplers import nfe

    with pytest.raises(ValueError, match="adaptive.*own steps"):
        nfe("adaptive", 10)


def test_cli_sample_records_the_nfe_it_used(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "multidiff.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, timeout=600)
    p = run("train", "toy", "train.steps=20", "train.ckpt_every=20", "--out", str(tmp_path / "run"), "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("sample", "toy", "--checkpoint", str(tmp_path / "run"), "--num", "8", "--sampler", "adaptive",
            "--out", str(tmp_path / "s"), "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])["metrics"]
    assert printed["sampler_nfe"] > 0
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["sampler_nfe"] == printed["sampler_nfe"]
