"""Screening table of molecule-generation objectives: EDM's metrics of runs trained at the same wall-clock budget.

Each RUN is sampled exactly as a user would (``multidiff sample molecules --checkpoint RUN``) with every
``--samplers`` x ``--steps`` setting; one JSON line per (run, sampler, steps, metric):

    python bench/molecules_screen.py runs/baseline runs/flow_x0 --num 1000 --samplers euler ancestral --steps 50 100

The run's recipe (``diffusion.*``, ``data.atom_types``, model size) and its training steps / wall-clock are printed
in each line's ``setting`` so the table says which levers a row has. ``--seed K`` samples the K-th disjoint block
of per-sample seeds (``multidiff sample --seed S`` gives sample i the seed S + i, so S and S + 1 share all but one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from multidiff.jobs import SEED_STRIDE  # noqa: E402  # blocks of per-sample seeds that never overlap
METRICS = ("atom_stability", "mol_stability", "validity", "uniqueness", "valid_x_unique")


def describe(run: Path) -> dict:
    """The levers of a run (from its config.yaml) and how long it trained (from log.jsonl)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    d, m, data = cfg["diffusion"], cfg["model"], cfg["data"]
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.startswith("{")]
    last = [r for r in lines if "step" in r and "wall_s" in r]
    return {
        "schedule": d["schedule"], "target": d["target"], "t_sampling": d["t_sampling"], "coupling": d.get("coupling"),
        "self_condition": d.get("self_condition", 0.0), "atom_types": data.get("atom_types", "continuous"),
        "categorical_weight": d.get("categorical_weight", 1.0), "model": f"{m['layers']}x{m['hidden']}",
        "precision": cfg["train"].get("precision", "fp32"),
        "train_steps": last[-1]["step"] if last else None, "train_minutes": round(last[-1]["wall_s"] / 60, 1) if last else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--samplers", nargs="+", default=["euler"])
    ap.add_argument("--steps", nargs="+", type=int, default=[100])
    ap.add_argument("--seed", type=int, default=0,
                    help="K: the K-th disjoint block of samples (sample i gets seed K * 2**20 + i; seeds K and K+1 "
                         "would otherwise share all but one sample)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for run in args.runs:
        setting = {"run": run.name, **describe(run)}
        for sampler in args.samplers:
            for steps in args.steps:
                with tempfile.TemporaryDirectory() as tmp:
                    cmd = [sys.executable, "-m", "multidiff.cli", "sample", "molecules", "--checkpoint", str(run),
                           "--num", str(args.num), "--steps", str(steps), "--sampler", sampler,
                           "--seed", str(args.seed * SEED_STRIDE),
                           "--out", str(Path(tmp) / "s")]
                    start = time.perf_counter()
                    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                    seconds = time.perf_counter() - start
                    metrics = json.loads((Path(tmp) / "s" / "metrics.json").read_text())
                nfe = 2 * steps - 1 if sampler == "heun" else steps
                row = {**setting, "sampler": sampler, "steps": steps, "nfe": nfe, "num": args.num,
                       "seed_block": args.seed}
                for name in METRICS:
                    emit(f"molecules_{name}", row, metrics.get(name), "fraction")
                emit("molecules_sampling_rate", row, args.num / seconds, "molecules/s (incl. load + metrics)")


if __name__ == "__main__":
    main()
