"""Molecule sampling speed and quality of a checkpoint: molecules/s and EDM metrics per (sampler, steps).

For every sampler in ``--samplers`` (default heun, dpmpp_2m, ancestral) and every number of grid intervals
in ``--steps`` (default 25, 50, 100, 250, 1000), ``--num`` molecules (default 1000) are sampled from the
checkpoint (default the shipped ``data/checkpoints/molecules.safetensors``) in batches of ``--batch``
(default 100) through the real pipeline: ``pipeline.load_model``, ``domain.request(cfg, batch, {}, seed=...)``,
``pipeline.generate(model, request, sampler=..., steps=..., grid=..., generator=...)`` and
``domain.decode``. Batch k uses seed ``--seed + k`` for both its atom counts and its noise, so every
(sampler, steps) setting sees the same molecule sizes and starting noise.

Per setting, one JSON line each ({"what", "setting", "number", "unit", "machine"}):
- ``molecules/s``: molecules / wall time of generate + decode (metrics excluded); the setting also carries
  the NFE (Heun spends 2 * steps - 1 denoiser evaluations on ``steps`` intervals, the others ``steps``).
- ``atom_stability``, ``mol_stability``, ``validity``, ``uniqueness`` (of valid), ``valid_x_unique``:
  ``domains.molecules.metrics.evaluate_molecules`` on all ``--num`` molecules (EDM, Hoogeboom et al. 2022).

Cost: at 50 steps the shipped checkpoint samples about 10-16 molecules/s on one CPU thread, so the default
grid (1000 molecules x 1425 steps per sampler, Heun twice the NFE) takes hours on a CPU; use e.g.
``--num 100 --steps 25 50`` for a quick look.

    python bench/molecules_sampling.py [--checkpoint data/checkpoints/molecules.safetensors] [--num 1000]
        [--steps 25 50 100 250 1000] [--samplers heun dpmpp_2m ancestral] [--batch 100] [--grid karras]
        [--seed 0] [--threads 1]

``sample_quality`` is reused by ``bench/molecules_training.py --quality-checkpoints``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from domains.molecules.metrics import evaluate_molecules  # noqa: E402
from multidiff.pipeline import LoadedModel, generate, load_model  # noqa: E402
from multidiff.samplers import nfe  # noqa: E402
from bench._common import emit  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "data" / "checkpoints" / "molecules.safetensors"
STEPS = (25, 50, 100, 250, 1000)
SAMPLERS = ("heun", "dpmpp_2m", "ancestral")
QUALITY = ("atom_stability", "mol_stability", "validity", "uniqueness", "valid_x_unique")


def sample_quality(model: LoadedModel, num: int, sampler: str, steps: int, *, batch: int = 100,
                   grid: str = "karras", seed: int = 0) -> dict[str, Any]:
    """Sample ``num`` unconditional molecules in batches; returns speed and the EDM metrics.

    Keys: ``seconds`` (generate + decode), ``molecules_per_s``, ``nfe`` and every key of ``evaluate_molecules``
    (``atom_stability``, ``mol_stability``, ``validity``, ``uniqueness``, ``valid_x_unique``, counts, and its own
    ``seconds`` as ``eval_seconds``).
    """
    if num < 1 or batch < 1:
        raise ValueError(f"--num and --batch must be >= 1, got {num} and {batch}")
    domain, cfg = model.domain, model.cfg
    mols: list[Any] = []
    seconds = 0.0
    for k, start in enumerate(range(0, num, batch)):
        n = min(batch, num - start)
        request = domain.request(cfg, n, {}, seed=seed + k)
        t = time.perf_counter()
        x = generate(model, request, sampler=sampler, steps=steps, grid=grid,
                     generator=torch.Generator().manual_seed(seed + k))
        mols.extend(domain.decode(x, request).molecules)
        seconds += time.perf_counter() - t
    metrics = dict(evaluate_molecules(mols))
    metrics["eval_seconds"] = metrics.pop("seconds")
    return {"seconds": seconds, "molecules_per_s": num / seconds, "nfe": nfe(sampler, steps), **metrics}


def emit_quality(result: dict[str, Any], setting: dict) -> None:
    """The quality lines of one ``sample_quality`` result."""
    for key in QUALITY:
        if result[key] is not None:  # None: undefined (e.g. uniqueness with no valid molecule)
            emit(key, setting, float(result[key]), "fraction")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="a .safetensors checkpoint or a run directory (default: the shipped molecules checkpoint)")
    p.add_argument("--num", type=int, default=1000, help="molecules per (sampler, steps)")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="grid intervals")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--batch", type=int, default=100, help="molecules per generate call (bounds memory)")
    p.add_argument("--grid", default="karras")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint)
    if model.domain.name != "molecules":
        raise SystemExit(f"{a.checkpoint}: a {model.domain.name!r} checkpoint, not molecules")
    for sampler in a.samplers:
        for steps in a.steps:
            r = sample_quality(model, a.num, sampler, steps, batch=a.batch, grid=a.grid, seed=a.seed)
            setting = {"checkpoint": str(a.checkpoint), "step": model.step, "sampler": sampler, "steps": steps,
                       "nfe": r["nfe"], "grid": a.grid, "num": a.num, "batch": a.batch, "seed": a.seed}
            emit("molecules/s", setting, r["molecules_per_s"], "molecules/s")
            emit_quality(r, setting)


if __name__ == "__main__":
    main()
