"""PFGM++ vs diffusion at equal training compute (Xu et al. 2023): the toy recipe trained with
``diffusion.kernel=pfgmpp diffusion.aug_dim=D`` for each D (``inf`` = the Gaussian kernel, i.e. diffusion), then
sampled from each kernel's own prior with deterministic samplers at 25 / 10 steps and with the step count cut hard.

Equal compute is equal training steps: the kernel costs one chi2 draw per item (the ``train_cpu_s_per_step`` lines
show it), while wall-clock budgets on this shared 2-core machine swing several-fold with the load (``--minutes`` is
there for an idle machine). One JSON line per (D, sampler, steps): ``sliced_wasserstein`` to fresh mixture draws
(N = --num; ``sw_floor``: true conditional draws with the same labels) and ``conditional_accuracy``. The toy item has N = 2 dimensions, so D = 128 / 2048 are already far into the
Gaussian regime (PFGM++'s robustness is claimed for D ~ N or below); D = 8 is added as the strongly non-Gaussian
point. Audio (N = 16,000) at equal wall-clock needs hours per D on this CPU and is not run here.

    OMP_NUM_THREADS=1 python bench/pfgmpp.py [--steps 1500 | --minutes 1.0] [--aug-dims 8,128,2048,inf] [--num 4000]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from multidiff import pipeline  # noqa: E402
from multidiff.registry import get_domain  # noqa: E402
from multidiff.samplers import nfe  # noqa: E402
from multidiff.toy import toy_mixture  # noqa: E402

SETTINGS = [("heun", s) for s in (25, 10, 5, 3, 2)] + [("dpmpp_2m", s) for s in (25, 10, 5, 3)] + [("euler", s) for s in (10, 5)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per D (the toy recipe's)")
    p.add_argument("--minutes", type=float, default=None, help="instead: training wall-clock per D")
    p.add_argument("--aug-dims", default="8,128,2048,inf")
    p.add_argument("--num", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    dom = get_domain("toy")
    base = pipeline.load_run_config(dom, None, [])
    gm = toy_mixture(base.data)
    labels = dom.request(base, a.num, {}, seed=a.seed).meta["labels"]
    truth = gm.means[labels] + gm.stds[labels, None] * torch.randn(a.num, 2, generator=torch.Generator().manual_seed(101),
                                                                   dtype=torch.float64)
    emit("pfgmpp_toy_sw_floor", {"num": a.num}, dom.metrics({"x": truth, "label": labels}, base.data)["sliced_wasserstein"],
         "sliced W2")
    for d in a.aug_dims.split(","):
        aug = float(d)
        budget = [f"train.steps={a.steps}"] if a.minutes is None else ["train.steps=1000000", f"train.max_minutes={a.minutes}"]
        over = budget + ["train.ckpt_every=1000000", f"train.seed={a.seed}"]
        over += [] if math.isinf(aug) else ["diffusion.kernel=pfgmpp", f"diffusion.aug_dim={aug}"]
        cfg = pipeline.load_run_config(dom, None, over)
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.time(), time.process_time()
            result = pipeline.train(dom, cfg, Path(tmp) / "run", device="cpu", progress=False)
            wall, cpu = time.time() - t0, time.process_time() - c0
            model = pipeline.load_model(Path(tmp) / "run")
        kernel = "gaussian (diffusion)" if math.isinf(aug) else f"pfgmpp D={d}"
        emit("pfgmpp_toy_train_steps", {"kernel": kernel, "minutes": a.minutes, "wall_s": round(wall, 1)}, result.step, "steps")
        emit("pfgmpp_toy_train_cpu_s_per_step", {"kernel": kernel}, cpu / max(1, result.step), "s")
        for sampler, steps in SETTINGS:
            request = dom.request(model.cfg, a.num, {}, seed=a.seed)
            x = pipeline.generate(model, request, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1))
            m = dom.metrics({"x": x, "label": request.meta["labels"]}, model.cfg.data)
            setting = {"kernel": kernel, "sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps), "num": a.num}
            emit("pfgmpp_toy_sliced_wasserstein", setting, m["sliced_wasserstein"], "sliced W2")
            emit("pfgmpp_toy_conditional_accuracy", setting, m["conditional_accuracy"], "share")


if __name__ == "__main__":
    main()
