"""Property steering of molecules: EDM's property-MAE protocol (Table 3) with predictor gradient guidance.

For every ``--scales`` value, ``--num`` molecules are sampled from the generator checkpoint (default: the
shipped unconditional one) with target properties drawn like EDM: atom count n from the training histogram,
then the target from p(property | n) of the generator half. Scale 0 is the plain model (what it scores by
chance); scale > 0 adds ``--gradient-scale`` guidance through the property predictor. The predictor then
scores every sample against its target (MAE, physical units) — note that the predictor judging its own
guidance flatters the guided rows (EDM evaluates with a predictor the generator never saw).

The baseline rows of ``domains.molecules.properties.property_baselines`` are printed first: the predictor on
real generator-half molecules (QM9 lower bound), on shuffled labels, and the atom-count-only predictor.

One JSON line per result ({"what", "setting", "number", "unit", "machine"}).

    python bench/molecules_properties.py --predictor runs/pred_alpha [--checkpoint C] [--num 200]
        [--scales 0 1 3] [--sampler dpmpp_2m] [--steps 50] [--batch 100] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import emit  # noqa: E402
from bench.molecules_sampling import DEFAULT_CHECKPOINT, QUALITY  # noqa: E402
from domains.molecules.constants import PROPERTY_UNITS  # noqa: E402
from domains.molecules.data import PropertyGivenN  # noqa: E402
from domains.molecules.metrics import evaluate_molecules  # noqa: E402
from multidiff.pipeline import generate, load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictor", required=True, help="property-predictor run or checkpoint")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="generator checkpoint")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint)
    dom, cfg = model.domain, model.cfg
    cfg.data.predictor = str(a.predictor)
    predictor = dom.predictor(cfg.data)
    names = [n for n in predictor.names if n not in cfg.data.conditioning]
    if not names:
        raise SystemExit(f"{a.checkpoint} is conditioned on every property {a.predictor} predicts; nothing to guide")
    common = {"predictor": str(a.predictor), "predictor_step": predictor.step}
    t = time.perf_counter()
    for name, rows in dom.property_baselines(cfg.data).items():
        for key, label in (("qm9", "mae_qm9_lower_bound"), ("shuffled", "mae_shuffled_labels"),
                           ("n_atoms", "mae_n_atoms_only")):
            emit(f"{name}_{label}", {**common, "molecules": rows["molecules"]}, rows[key], PROPERTY_UNITS[name])
    emit("baseline_seconds", common, time.perf_counter() - t, "s")

    qm9 = dom.qm9(cfg.data)
    from domains.molecules.data import _resolve_indices

    given_n = PropertyGivenN.from_qm9(qm9, _resolve_indices(len(qm9), "generator"), names)
    for scale in a.scales:
        mols, targets, seconds = [], [], 0.0
        for k, start in enumerate(range(0, a.num, a.batch)):
            n = min(a.batch, a.num - start)
            req = dom.request(cfg, n, {name: "0" for name in names}, seed=a.seed + k)
            drawn = given_n.sample(req.meta["sizes"], generator=torch.Generator().manual_seed(a.seed + k))
            req.meta["properties"] = {name: drawn[:, j].tolist() for j, name in enumerate(names)}
            t = time.perf_counter()
            x = generate(model, req, sampler=a.sampler, steps=a.steps, gradient_scale=scale,
                         generator=torch.Generator().manual_seed(a.seed + k))
            mols.extend(dom.decode(x, req).molecules)
            seconds += time.perf_counter() - t
            targets.append(drawn)
        target = torch.cat(targets).to(torch.float64)
        pred = predictor.predict(mols)
        setting = {**common, "checkpoint": str(a.checkpoint), "step": model.step, "scale": scale,
                   "sampler": a.sampler, "steps": a.steps, "num": a.num, "seed": a.seed}
        cols = [predictor.names.index(nm) for nm in names]
        for j, name in enumerate(names):
            emit(f"{name}_mae", setting, float((pred[:, cols[j]] - target[:, j]).abs().mean()), PROPERTY_UNITS[name])
        emit("molecules/s", setting, a.num / seconds, "molecules/s")
        quality = evaluate_molecules(mols)
        for key in QUALITY:
            if quality[key] is not None:  # None: undefined (e.g. uniqueness with no valid molecule)
                emit(key, setting, float(quality[key]), "fraction")


if __name__ == "__main__":
    main()
