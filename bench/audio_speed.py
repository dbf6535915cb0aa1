"""Audio-domain speed on this CPU: sampling real-time factor per sampler and step count, and training clips/s.

The model is an *untrained* denoiser built from a recipe (``--recipe``, default ``waveform``: 1 s clips at 16 kHz);
speed does not depend on the weights. Built through the same calls as ``multidiff sample`` / ``multidiff train``:
``registry.get_domain("audio")``, ``pipeline.load_run_config``, ``pipeline.build_denoiser``, then
``domain.request(cfg, batch, {"label": "7"})`` + ``pipeline.generate`` (karras grid; classifier-free guidance off
unless ``--guidance``: a guided step is one call on a doubled batch, except outside ``--guidance-interval``).

Numbers, one JSON line each (``{"what", "setting", "number", "unit", "machine"}``):
- ``rtf``: compute seconds per second of generated audio (wall time of one ``generate`` call for ``--batch`` clips,
  divided by ``--batch`` x clip seconds); < 1 is faster than real time. Best of ``--repeats``.
- ``x real time``: its inverse (seconds of audio per compute second).
- ``train clips/s``: forward + backward (``domain.loss``) + gradient clipping + AdamW step on batches of the
  recipe's ``train.batch_size`` (random waveforms and labels by default, ``--train-data real`` for the recipe's
  clips); EMA, data loading and logging are not included. Timed over ``--train-steps`` after one warm-up step.
- with ``--both-malloc``: the whole measurement is repeated in a fresh subprocess with
  ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`` and ``tuned / default``
  speed ratios are printed (> 1: the tunables help). The in-process run uses glibc's default malloc settings.

One warm-up ``generate`` (2 steps) precedes the timed calls. The default grid (4 samplers x steps 10/25/50/100,
batch 16) is long on 2 cores (tens of minutes); a quick look:

    python bench/audio_speed.py --samplers dpmpp_2m,heun --steps 10,25 --batch 4 --both-malloc
    python bench/audio_speed.py [--recipe waveform] [--threads 2] [--batch 16] [--repeats 1] [--train-steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from multidiff import pipeline  # noqa: E402
from multidiff.registry import get_domain  # noqa: E402
from multidiff.samplers import nfe  # noqa: E402
from bench._common import emit  # noqa: E402

MALLOC_TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
SAMPLERS = ("dpmpp_2m", "heun", "ddim", "ancestral")
STEPS = (10, 25, 50, 100)


def malloc_name() -> str:
    """Which glibc malloc settings this process runs with."""
    env = os.environ.get("GLIBC_TUNABLES")
    return "default" if not env else ("tuned" if env == MALLOC_TUNED else f"GLIBC_TUNABLES={env}")


def csv(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def measure(a: argparse.Namespace) -> list[dict]:
    """All sampling and training numbers of this process."""
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    domain = get_domain("audio")
    cfg = domain.resolve(pipeline.load_run_config(domain, a.recipe, a.overrides))
    den = pipeline.build_denoiser(domain, cfg)
    params = sum(p.numel() for p in den.parameters())
    seconds, sr = cfg.data.seconds, cfg.data.sample_rate
    interval = tuple(a.guidance_interval) if a.guidance_interval else None
    base = {"recipe": a.recipe, "overrides": a.overrides, "guidance": a.guidance, "guidance_interval": interval,
            "params": params, "clip_s": seconds, "sample_rate": sr, "malloc": malloc_name()}
    out: list[dict] = []

    # --- sampling ---
    den.eval().requires_grad_(False)
    model = pipeline.LoadedModel(domain, cfg, den, None, Path(f"untrained:{a.recipe}"))
    request = domain.request(cfg, a.batch, {"label": "7"})
    pipeline.generate(model, request, sampler="dpmpp_2m", steps=2, generator=torch.Generator().manual_seed(0))
    for name in a.samplers:
        for steps in a.steps:
            best = float("inf")
            for r in range(a.repeats):
                g = torch.Generator().manual_seed(r)
                t = time.perf_counter()
                x = pipeline.generate(model, request, sampler=name, steps=steps, grid=cfg.sample.grid, generator=g,
                                      guidance=a.guidance, guidance_interval=interval)
                best = min(best, time.perf_counter() - t)
                if not torch.isfinite(x).all():
                    raise SystemExit(f"{name}, {steps} steps: non-finite samples")
            rtf = best / (a.batch * seconds)
            setting = {**base, "sampler": name, "steps": steps, "nfe": nfe(name, steps), "batch": a.batch,
                       "grid": cfg.sample.grid}
            out.append(emit("rtf", setting, rtf, "compute s / audio s"))
            out.append(emit("x real time", setting, 1.0 / rtf, "x"))

    # --- training ---
    if a.train_steps == 0:
        return out
    den.train().requires_grad_(True)
    tc = cfg.train
    opt = torch.optim.AdamW(den.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    bs = tc.batch_size
    if a.train_data == "real":
        ds = domain.build_dataset(cfg, "train")
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        collate = domain.collate_fn(cfg)
        batches = [collate([ds[int(i)] for i in perm[k * bs:(k + 1) * bs]])
                   for k in range(max(1, min(a.train_steps + 1, len(ds) // bs)))]
    else:
        g = torch.Generator().manual_seed(0)
        length = request.like.shape[-1]
        ncls = len(cfg.data.class_names)
        batches = [((0.3 * torch.randn(bs, 1, length, generator=g)).clamp(-1, 1),
                    torch.randint(0, ncls, (bs,), generator=g)) for _ in range(2)]

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss = domain.loss(den, batches[i % len(batches)])
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(den.parameters(), tc.grad_clip)
        opt.step()

    step(0)  # warm-up
    t = time.perf_counter()
    for i in range(1, a.train_steps + 1):
        step(i)
    dt = time.perf_counter() - t
    setting = {**base, "batch": bs, "data": a.train_data, "timed_steps": a.train_steps,
               "step": "forward+backward+clip+AdamW"}
    out.append(emit("train clips/s", setting, a.train_steps * bs / dt, "clips/s"))
    out.append(emit("train s/step", setting, dt / a.train_steps, "s"))
    return out


def child_run(argv: list[str], tunables: str | None) -> list[dict]:
    """Re-run this script (measure only) in a fresh process with/without GLIBC_TUNABLES; stream its lines."""
    env = dict(os.environ, MULTIDIFF_MALLOC="system")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    else:
        env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], env=env, stdout=subprocess.PIPE,
                            text=True)
    recs = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            recs.append(json.loads(line))
    if proc.wait():
        raise SystemExit(f"the {'tuned' if tunables else 'default'}-malloc subprocess failed ({proc.returncode})")
    return recs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="waveform", help="audio recipe name or YAML path")
    p.add_argument("--samplers", type=lambda s: csv(str, s), default=list(SAMPLERS), help="comma-separated")
    p.add_argument("--steps", type=lambda s: csv(int, s), default=list(STEPS), help="comma-separated grid intervals")
    p.add_argument("--batch", type=int, default=16, help="clips per generate call")
    p.add_argument("--repeats", type=int, default=1, help="timed generate calls per setting; the best is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (0: skip training)")
    p.add_argument("--train-data", choices=("random", "real"), default="random")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: off, one pass per step)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for LO < t <= HI (one pass per step outside)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted recipe override, e.g. --set model.full_rate_channels=8 (repeatable)")
    p.add_argument("--both-malloc", action="store_true",
                   help="also run in a subprocess with the tuned GLIBC_TUNABLES and print tuned/default ratios")
    a = p.parse_args()
    if a.train_steps < 0 or a.batch < 1 or a.repeats < 1:
        p.error("--train-steps must be >= 0, --batch and --repeats >= 1")
    if not a.both_malloc:
        measure(a)
        return
    argv = [arg for arg in sys.argv[1:] if arg != "--both-malloc"]
    if malloc_name() == "default":
        default = measure(a)
    else:  # this process already has tunables: measure the default in a clean subprocess too
        default = child_run(argv, None)
    tuned = child_run(argv, MALLOC_TUNED)

    def key(r: dict) -> str:
        s = {k: v for k, v in r["setting"].items() if k != "malloc"}
        return json.dumps([r["what"], s], sort_keys=True)

    by_key = {key(r): r for r in default}
    for r in tuned:
        d = by_key.get(key(r))
        if d is None or r["what"] not in ("x real time", "train clips/s"):
            continue
        setting = {k: v for k, v in r["setting"].items() if k != "malloc"}
        emit(f"malloc tuned / default ({r['what']})", setting, r["number"] / d["number"], "x")


if __name__ == "__main__":
    main()
