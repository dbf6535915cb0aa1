"""Training speed of a molecules recipe on CPU (molecules/s), optionally with/without the glibc malloc tunables,
and the sample quality of given checkpoints (e.g. the runs after 1 h and 3 h of training).

Speed: the recipe (``--recipe``, default ``fast``; plus dotted ``--set`` overrides) is built as ``multidiff train``
builds it: ``registry.get_domain("molecules")``, ``pipeline.load_run_config``, ``pipeline.build_denoiser``, a
DataLoader over ``domain.build_dataset(cfg, "train")`` with ``domain.collate`` (shuffled, batch
``train.batch_size``), and per step ``domain.loss(denoiser, batch)``, backward, gradient clipping at
``train.grad_clip`` and ``torch.optim.AdamW`` (``train.lr`` / ``betas`` / ``weight_decay``). No EMA, LR schedule,
logging or checkpoints: this is the model + data cost alone. ``--warmup`` steps (default 10) run first and are not
timed; the next ``--steps`` (default 100) are timed, data loading included.

Lines (one JSON line each, {"what", "setting", "number", "unit", "machine"}):
- ``train molecules/s`` and ``train steps/s`` over the timed steps; ``peak RSS`` (ru_maxrss) of the process.
- With ``--both-malloc``: the same measurement is repeated in a subprocess with the other malloc setting
  (``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736`` when this process runs
  without it, no GLIBC_TUNABLES when it runs with it); its lines are forwarded and ``malloc tuned / default``
  gives the ratio of molecules/s. The two runs are sequential on a shared machine: compare with the load1
  in the ``machine`` field in mind.
- With ``--quality-checkpoints A B ...``: for each checkpoint, ``--num`` molecules (default 1000) are sampled with
  ``--sampler`` / ``--sample-steps`` (default dpmpp_2m, 50) and scored by ``bench/molecules_sampling.py``'s
  ``sample_quality`` (atom stability, molecule stability, validity, uniqueness, valid x unique), plus the
  sampling molecules/s.

    python bench/molecules_training.py [--recipe fast] [--steps 100] [--warmup 10] [--threads 1] [--both-malloc]
        [--set train.batch_size=128 ...] [--quality-checkpoints RUN_1H RUN_3H ... --num 1000 --sample-steps 50]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from molecules_sampling import emit, emit_quality, sample_quality  # noqa: E402  (also puts the repo root on sys.path)

MALLOC_TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def malloc_state() -> str:
    """'tuned' when this process runs with MALLOC_TUNED, 'default' without GLIBC_TUNABLES, else the raw value."""
    value = os.environ.get("GLIBC_TUNABLES")
    if value is None:
        return "default"
    return "tuned" if value == MALLOC_TUNED else f"GLIBC_TUNABLES={value}"


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(recipe: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup`` + ``steps`` steps of the recipe; speed over the last ``steps``."""
    from torch.utils.data import DataLoader

    from multidiff.pipeline import build_denoiser, load_run_config
    from multidiff.registry import get_domain

    domain = get_domain("molecules")
    cfg = load_run_config(domain, recipe, overrides)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    denoiser = build_denoiser(domain, cfg).train()
    dataset = domain.build_dataset(cfg, "train")
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, collate_fn=domain.collate,
                        num_workers=tc.num_workers, generator=torch.Generator().manual_seed(tc.seed))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf

    molecules = atoms = done = 0
    losses: list[float] = []
    start = time.perf_counter()
    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                molecules = atoms = 0
                losses.clear()
                start = time.perf_counter()
            loss = domain.loss(denoiser, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
            losses.append(float(loss.detach()))
            molecules += batch["num_graphs"]
            atoms += len(batch["batch"])
            done += 1
            if done == warmup + steps:
                break
    seconds = time.perf_counter() - start
    return {
        "molecules_per_s": molecules / seconds, "steps_per_s": steps / seconds, "atoms_per_s": atoms / seconds,
        "seconds": seconds, "mean_loss": sum(losses) / len(losses), "batch": tc.batch_size,
        "params": sum(p.numel() for p in params), "peak_rss_mib": peak_rss_mib(),
    }


def speed_lines(r: dict[str, Any], setting: dict) -> None:
    emit("train molecules/s", setting, r["molecules_per_s"], "molecules/s")
    emit("train steps/s", setting, r["steps_per_s"], "steps/s")
    emit("peak RSS", setting, r["peak_rss_mib"], "MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="fast", help="recipe name under configs/molecules or a YAML path")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, as `multidiff train` takes them")
    p.add_argument("--steps", type=int, default=100, help="timed training steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--both-malloc", action="store_true",
                   help="also measure in a subprocess with the other glibc malloc setting and report the ratio")
    p.add_argument("--quality-checkpoints", type=Path, nargs="*", default=[], metavar="CKPT",
                   help="checkpoints (.safetensors or run dirs) to sample and score")
    p.add_argument("--num", type=int, default=1000, help="molecules sampled per quality checkpoint")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-batch", type=int, default=100)
    p.add_argument("--grid", default="karras")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-train", action="store_true", help="skip the speed measurement (quality only)")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)

    if not a.no_train:
        here = measure(a.recipe, a.overrides, a.steps, a.warmup)
        base = {"recipe": a.recipe, "overrides": a.overrides, "batch": here["batch"], "params": here["params"],
                "steps": a.steps, "warmup": a.warmup, "threads": torch.get_num_threads()}
        speed_lines(here, {**base, "malloc": malloc_state()})
        if a.both_malloc:
            env = dict(os.environ, MULTIDIFF_MALLOC="system")
            if malloc_state() == "tuned":
                env.pop("GLIBC_TUNABLES")
            else:
                env["GLIBC_TUNABLES"] = MALLOC_TUNED
            cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe", a.recipe, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--threads", str(a.threads), "--set", *a.overrides]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            other = None
            for line in proc.stdout.splitlines():
                print(line, flush=True)
                rec = json.loads(line)
                if rec["what"] == "train molecules/s":
                    other = rec
            if other is None:
                raise SystemExit(f"no 'train molecules/s' line from {' '.join(cmd)}:\n{proc.stdout[-2000:]}")
            states = {malloc_state(): here["molecules_per_s"], other["setting"]["malloc"]: other["number"]}
            if set(states) == {"tuned", "default"}:
                emit("malloc tuned / default", {**base, "tuned": MALLOC_TUNED},
                     states["tuned"] / states["default"], "x molecules/s")
            else:
                print(f"not a tuned/default pair: {sorted(states)} (this process has GLIBC_TUNABLES="
                      f"{os.environ.get('GLIBC_TUNABLES')!r}); no ratio", file=sys.stderr)

    if a.quality_checkpoints:
        from multidiff.pipeline import load_model

        for ckpt in a.quality_checkpoints:
            model = load_model(ckpt)
            if model.domain.name != "molecules":
                raise SystemExit(f"{ckpt}: a {model.domain.name!r} checkpoint, not molecules")
            r = sample_quality(model, a.num, a.sampler, a.sample_steps, batch=a.sample_batch, grid=a.grid, seed=a.seed)
            setting = {"checkpoint": str(ckpt), "step": model.step, "sampler": a.sampler, "steps": a.sample_steps,
                       "nfe": r["nfe"], "grid": a.grid, "num": a.num, "seed": a.seed}
            emit("molecules/s", setting, r["molecules_per_s"], "molecules/s")
            emit_quality(r, setting)


if __name__ == "__main__":
    main()
