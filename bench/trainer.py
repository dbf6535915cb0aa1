"""Training speed of the toy domain on CPU through the real pipeline: 1 process vs 2 (torchrun, gloo),
checkpoint overhead, each with and without the glibc malloc tunables.

Usage: python bench/trainer.py [--seconds 5] [--repeats 2] [--log-every 10]

Each measurement trains the toy domain (configs/toy/default.yaml; global batch = train.batch_size, 256) in fresh
process(es) via ``registry.get_domain("toy")``, ``pipeline.load_run_config`` and ``pipeline.train(..., device="cpu")``
for a fixed wall-clock budget (``train.max_minutes``, with ``train.steps`` set out of reach). Two processes are
launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2 bench/trainer.py --worker ...``
(the same ``pipeline.train`` call; DDP over gloo, each rank gets batch_size / 2).

steps/s is read from the run's ``out/log.jsonl``: (last step - first logged step) / (difference of their ``wall_s``),
so process start-up, dataset/model building and the first ``--log-every`` steps (warm-up) are excluded.
Checkpoint overhead compares ``train.ckpt_every=10`` with ``ckpt_every`` = 10**9; the time per checkpoint is timed
directly around ``Trainer._save`` (RNG gather, optimizer state, safetensors + state.pt, fsync, rename, pruning),
excluding the end-of-run save. "malloc tuned" runs set GLIBC_TUNABLES to MALLOC_TUNED, "malloc default" runs
unset it; both set MULTIDIFF_MALLOC=system so nothing adds the tunables behind the bench's back.
Default run (5 s x 2 repeats x 8 settings, plus start-up) takes about 3-4 minutes on 2 cores.

Prints one JSON line per result: {"what", "setting", "number", "unit", "machine"}; the best of --repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MALLOC_TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
NO_CKPT = 10**9


def worker(args: argparse.Namespace) -> None:
    """Train the toy domain for a fixed time; rank 0 writes steps/s (from log.jsonl) and checkpoint time."""
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from multidiff import pipeline
    from multidiff.registry import get_domain
    from multidiff.training import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)

    saves: list[float] = []
    original = Trainer._save

    def timed_save(self: Trainer, *a: object, **kw: object) -> Path | None:
        t = time.perf_counter()
        out = original(self, *a, **kw)  # type: ignore[arg-type]
        saves.append(time.perf_counter() - t)
        return out

    Trainer._save = timed_save  # type: ignore[method-assign]
    domain = get_domain("toy")
    cfg = pipeline.load_run_config(domain, None, [
        f"train.steps={NO_CKPT}",
        f"train.max_minutes={args.seconds / 60}",
        f"train.ckpt_every={args.ckpt_every}",
        f"train.log_every={args.log_every}",
    ])
    out = Path(args.out)
    result = pipeline.train(domain, cfg, out, progress=False, device="cpu")
    if result.log_path is None:  # not rank 0
        return
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    timed = [r for r in records if "wall_s" in r]
    if not timed:
        raise SystemExit(f"no timed log records in {result.log_path}")
    # too slow to log twice: fall back to the whole loop (first steps included), and say so in the setting
    first, last = (timed[0], timed[-1]) if len(timed) >= 2 else ({"step": 0, "wall_s": 0.0}, timed[-1])
    periodic = saves[:-1]  # the last save is the end-of-run one, not periodic
    params = sum(p.numel() for p in pipeline.build_denoiser(domain, cfg).parameters())
    Path(args.result).write_text(json.dumps({
        "steps_per_s": (last["step"] - first["step"]) / (last["wall_s"] - first["wall_s"]),
        "steps": result.step,
        "window": f"steps {first['step']}-{last['step']}" + ("" if len(timed) >= 2 else " (whole loop, too slow to log twice)"),
        "ckpt_ms": 1000 * sum(periodic) / max(1, len(periodic)),
        "ckpts": len(periodic),
        "params": params,
        "batch": cfg.train.batch_size,
    }))


def run(seconds: float, ckpt_every: int, nproc: int, threads: int, malloc: str | None,
        log_every: int) -> dict[str, float]:
    """Run one worker configuration in fresh process(es) and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["OMP_NUM_THREADS"] = str(threads)
        env["MULTIDIFF_MALLOC"] = "system"  # the bench decides GLIBC_TUNABLES itself
        if malloc:
            env["GLIBC_TUNABLES"] = malloc
        else:
            env.pop("GLIBC_TUNABLES", None)
        wargs = [str(Path(__file__).resolve()), "--worker", "--out", str(Path(tmp) / "run"), "--result", str(result),
                 "--seconds", str(seconds), "--ckpt-every", str(ckpt_every), "--threads", str(threads),
                 "--log-every", str(log_every)]
        if nproc == 1:
            cmd = [sys.executable, *wargs]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *wargs]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    """Run every configuration and print one JSON line per number."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-every", type=int, default=NO_CKPT, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=5.0, help="training time per measurement (train.max_minutes)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    ap.add_argument("--log-every", type=int, default=10,
                    help="train.log_every; steps/s is measured from the first logged step to the last")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import emit as emit_json

    def emit(what: str, setting: str, number: float, unit: str) -> None:
        emit_json(what, setting, number, unit, digits=3)

    def best(**kw: object) -> dict[str, float]:
        runs = [run(seconds=args.seconds, log_every=args.log_every, **kw)  # type: ignore[arg-type]
                for _ in range(args.repeats)]
        return max(runs, key=lambda r: r["steps_per_s"])

    for malloc_name, malloc in (("malloc default", None), ("malloc tuned", MALLOC_TUNED)):
        one_2t = best(ckpt_every=NO_CKPT, nproc=1, threads=2, malloc=malloc)
        tag = (f"toy domain (configs/toy/default.yaml, {one_2t['params'] / 1e3:.0f}k params), "
               f"global batch {one_2t['batch']}, {malloc_name}")
        emit("train steps/s", f"1 process x 2 threads, {tag}, {one_2t['window']}", one_2t["steps_per_s"], "steps/s")
        r = best(ckpt_every=NO_CKPT, nproc=1, threads=1, malloc=malloc)
        one_1t = r["steps_per_s"]
        emit("train steps/s", f"1 process x 1 thread, {tag}, {r['window']}", one_1t, "steps/s")
        r = best(ckpt_every=NO_CKPT, nproc=2, threads=1, malloc=malloc)
        two = r["steps_per_s"]
        emit("train steps/s", f"torchrun 2 processes x 1 thread (gloo), {tag}, {r['window']}", two, "steps/s")
        emit("2-process / 1-process", f"torchrun 2x1 thread vs 1 process x 2 threads, {tag}",
             two / one_2t["steps_per_s"], "x")
        emit("2-process / 1-process", f"torchrun 2x1 thread vs 1 process x 1 thread, {tag}", two / one_1t, "x")
        ck = best(ckpt_every=10, nproc=1, threads=1, malloc=malloc)
        emit("train steps/s", f"1 process x 1 thread, ckpt_every=10, {tag}, {ck['window']}", ck["steps_per_s"],
             "steps/s")
        emit("checkpoint overhead", f"ckpt_every=10 vs {NO_CKPT}, 1 process x 1 thread, {tag}",
             100 * (1 - ck["steps_per_s"] / one_1t), "% steps/s")
        emit("time per checkpoint", f"Trainer._save timed ({ck['ckpts']} saves: model+EMA safetensors, state.pt, "
             f"sha256, fsync, rename, prune), 1 process x 1 thread; {tag}", ck["ckpt_ms"], "ms")


if __name__ == "__main__":
    main()
