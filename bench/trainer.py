"""Trainer speed on CPU: 1 process vs 2 (torchrun, gloo), checkpoint overhead, with/without glibc malloc tuning.

Usage: python bench/trainer.py [--seconds 5] [--repeats 2]
Each measurement trains for a fixed wall-clock budget (train.max_minutes) in fresh process(es) and reports
steps/s over the training loop only (start-up excluded); checkpoint time is also timed directly.
Prints one JSON line per result: {"what", "setting", "number", "unit", "machine"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MALLOC_TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def worker(args: argparse.Namespace) -> None:
    """Train a small MLP on synthetic data for a fixed time; rank 0 writes steps/s and checkpoint time."""
    import time

    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    import multidiff.checkpoint as ckpt_io
    from multidiff.training import TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g)
    ds = torch.utils.data.TensorDataset(x, torch.tanh(x @ torch.randn(64, 64, generator=g)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, 64))

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (m(batch[0]) - batch[1]).pow(2).mean()

    saves: list[float] = []
    original = ckpt_io.save_checkpoint

    def timed_save(*a: object, **kw: object) -> Path:
        t = time.perf_counter()
        out = original(*a, **kw)  # type: ignore[arg-type]
        saves.append(time.perf_counter() - t)
        return out

    ckpt_io.save_checkpoint = timed_save  # type: ignore[assignment]
    cfg = TrainConfig(steps=10**9, max_minutes=args.seconds / 60, batch_size=256, lr=1e-3, warmup_steps=10,
                      log_every=50, ckpt_every=args.ckpt_every, keep_checkpoints=2)
    result = Trainer(model, loss_fn, ds, cfg, Path(args.out), progress=False).fit()
    if result.log_path is not None:  # rank 0 only; the last save is the end-of-run one, not periodic
        periodic = saves[:-1]
        Path(args.result).write_text(json.dumps({
            "steps_per_s": result.step / result.elapsed_s,
            "ckpt_ms": 1000 * sum(periodic) / max(1, len(periodic)),
            "ckpts": len(periodic),
            "params": sum(p.numel() for p in model.parameters()),
        }))


def machine() -> str:
    """A short description of this machine and its load."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}, load1 {load:.1f}")


def run(seconds: float, ckpt_every: int, nproc: int, threads: int, malloc: str | None) -> dict[str, float]:
    """Run one worker configuration in fresh process(es) and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["OMP_NUM_THREADS"] = str(threads)
        if malloc:
            env["GLIBC_TUNABLES"] = malloc
        else:
            env.pop("GLIBC_TUNABLES", None)
        wargs = [str(Path(__file__).resolve()), "--worker", "--out", str(Path(tmp) / "run"), "--result", str(result),
                 "--seconds", str(seconds), "--ckpt-every", str(ckpt_every), "--threads", str(threads)]
        if nproc == 1:
            cmd = [sys.executable, *wargs]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *wargs]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(result.read_text())


def main() -> None:
    """Run every configuration and print one JSON line per number."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-every", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=5.0, help="training time per measurement")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cpus = os.cpu_count() or 1
    where = machine()

    def emit(what: str, setting: str, number: float, unit: str) -> None:
        print(json.dumps({"what": what, "setting": setting, "number": round(number, 3), "unit": unit,
                          "machine": where}), flush=True)

    def best(**kw: object) -> dict[str, float]:
        runs = [run(seconds=args.seconds, **kw) for _ in range(args.repeats)]  # type: ignore[arg-type]
        return max(runs, key=lambda r: r["steps_per_s"])

    for malloc_name, malloc in (("malloc default", None), ("malloc tuned", MALLOC_TUNED)):
        tag = f"MLP 64-512-512-64 (0.33M params), global batch 256, {malloc_name}"
        one_all = best(ckpt_every=0, nproc=1, threads=cpus, malloc=malloc)["steps_per_s"]
        emit("train steps/s", f"1 process x {cpus} threads, {tag}", one_all, "steps/s")
        one_1t = best(ckpt_every=0, nproc=1, threads=1, malloc=malloc)["steps_per_s"]
        emit("train steps/s", f"1 process x 1 thread, {tag}", one_1t, "steps/s")
        two = best(ckpt_every=0, nproc=2, threads=1, malloc=malloc)["steps_per_s"]
        emit("train steps/s", f"torchrun 2 processes x 1 thread (gloo), {tag}", two, "steps/s")
        emit("2-process speed-up", f"torchrun 2x1 thread vs 1 process x {cpus} threads, {tag}", two / one_all, "x")
        emit("2-process speed-up", f"torchrun 2x1 thread vs 1 process x 1 thread, {tag}", two / one_1t, "x")
        ck = best(ckpt_every=10, nproc=1, threads=1, malloc=malloc)
        emit("train steps/s", f"1 process x 1 thread, ckpt_every=10, {tag}", ck["steps_per_s"], "steps/s")
        emit("checkpoint overhead", f"ckpt_every=10 vs none, 1 process x 1 thread, {tag}",
             100 * (1 - ck["steps_per_s"] / one_1t), "% steps/s")
        emit("time per checkpoint", f"model+EMA safetensors, state.pt, sha256, fsync, rename; {tag}",
             ck["ckpt_ms"], "ms")


if __name__ == "__main__":
    main()
