"""Sampler quality at a fixed budget: distance to the true 2-D mixture at NFE in {5, 10, 20, 50, 100}.

Two numbers per (sampler, NFE), each printed as one JSON line:
Every sampler starts from the exact marginal at the grid's first time, so the numbers measure the
sampler alone.
- ``sliced_wasserstein``: sliced W2 between samples and fresh draws of the true mixture (N = 10,000);
  the line ``sw_floor`` gives the same distance between two independent true samples (the noise floor).
- ``ode_error``: RMS distance to a 1000-step Heun solution of the probability-flow ODE from the same
  starting noise (deterministic samplers only): the discretisation error, free of sampling noise.

The error-controlled ``adaptive`` sampler picks its own steps, so it is not run at the fixed budgets: it is run once
per tolerance in ``--tols`` (rtol = atol = tol, from the same grid's end points and start) and its lines carry the
``nfe`` it reported (``stats``), with the same ``sliced_wasserstein`` / ``ode_error`` / ``seconds`` numbers, to read
against the fixed grids' error at that NFE.

    python bench/samplers.py [--num 10000] [--schedule cosine] [--grid karras] [--tols 1e-2,3e-3,1e-3,3e-4,1e-4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from multidiff.analytic import sliced_wasserstein
from multidiff.demo import demo_mixture
from multidiff.samplers import SAMPLERS, get_sampler, nfe, prior
from multidiff.schedules import get_schedule, make_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

NFES = (5, 10, 20, 50, 100)
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m")


def steps_for(name: str, budget: int) -> int:
    """Grid intervals that spend at most ``budget`` denoiser evaluations."""
    return max(1, (budget + 1) // 2) if name == "heun" else budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=10_000)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--grid", default="karras")
    p.add_argument("--tols", default="1e-2,3e-3,1e-3,3e-4,1e-4", help="adaptive: rtol = atol values ('' to skip)")
    a = p.parse_args()
    gm = demo_mixture()
    sch = get_schedule(a.schedule)
    truth, _ = gm.sample(a.num, torch.Generator().manual_seed(100))
    other, _ = gm.sample(a.num, torch.Generator().manual_seed(101))
    sw_gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731  same projections for every line
    emit("sw_floor", {"num": a.num}, sliced_wasserstein(other, truth, generator=sw_gen()), "sliced W2")
    ts_ref = make_grid(sch, 1000, a.grid)
    # start from the exact marginal at the grid's first time (alpha x0 + sigma eps), so that every
    # difference from the truth is the sampler's own error, not a prior mismatch at sigma_max = 80
    g = torch.Generator().manual_seed(0)
    x0, _ = gm.sample(a.num, g)
    t0 = ts_ref[0]
    x_T = float(sch.alpha(t0)) * x0 + prior(sch, t0, x0, None, g)
    ref = get_sampler("heun")(gm.denoiser(sch), x_T, ts_ref, sch)
    for name in SAMPLERS:
        if name == "adaptive":
            continue
        for budget in NFES:
            steps = steps_for(name, budget)
            ts = make_grid(sch, steps, a.grid)
            setting = {"sampler": name, "nfe": nfe(name, steps), "steps": steps, "schedule": a.schedule, "grid": a.grid}
            start = time.perf_counter()
            try:
                assert float(ts[0]) == float(t0), f"every grid of one kind starts at the same time: {float(ts[0])} vs {float(t0)}"
                out = get_sampler(name)(gm.denoiser(sch), x_T, ts, sch, generator=torch.Generator().manual_seed(1))
            except ValueError as e:
                print(json.dumps({"what": "error", "setting": setting, "error": str(e)}))
                continue
            emit("sliced_wasserstein", setting, sliced_wasserstein(out, truth, generator=sw_gen()), "sliced W2")
            if name in DETERMINISTIC:
                emit("ode_error", setting, float(((out - ref) ** 2).mean().sqrt()), "RMS")
            emit("seconds", setting, time.perf_counter() - start, "s")

    ts = make_grid(sch, 25, a.grid)  # adaptive reads only the grid's end points
    for tol in [float(v) for v in a.tols.split(",") if v.strip()]:
        stats: dict[str, int] = {}
        start = time.perf_counter()
        out = get_sampler("adaptive")(gm.denoiser(sch), x_T, ts, sch, rtol=tol, atol=tol, stats=stats)
        secs = time.perf_counter() - start
        setting = {"sampler": "adaptive", "rtol": tol, "atol": tol, "nfe": stats["nfe"], "accepted": stats["accepted"],
                   "rejected": stats["rejected"], "schedule": a.schedule, "grid": a.grid}
        emit("sliced_wasserstein", setting, sliced_wasserstein(out, truth, generator=sw_gen()), "sliced W2")
        emit("ode_error", setting, float(((out - ref) ** 2).mean().sqrt()), "RMS")
        emit("seconds", setting, secs, "s")


if __name__ == "__main__":
    main()
