"""Training speed of a molecules recipe on CPU (molecules/s), optionally with/without the glibc malloc tunables,
and the sample quality of given checkpoints (e.g. the runs after 1 h and 3 h of training).

Speed: the recipe (``--recipe``, default ``fast``; plus dotted ``--set`` overrides) is built as ``multidiff train``
builds it: ``registry.get_domain("molecules")``, ``pipeline.load_run_config``, ``pipeline.build_denoiser``, a
DataLoader over ``domain.build_dataset(cfg, "train")`` with ``domain.collate_fn(cfg)`` (shuffled, batch
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

The recipe's ``train.precision`` is applied as the Trainer applies it (``multidiff.training.with_precision``:
bf16 autocast around the training module with fp32 outputs, fp32 on a CPU without native bf16).

    python bench/molecules_training.py [--recipe fast] [--steps 100] [--warmup 10] [--threads 1] [--both-malloc]
        [--set train.batch_size=128 ...] [--quality-checkpoints RUN_1H RUN_3H ... --num 1000 --sample-steps 50]

Throughput matrix (``--matrix``, issue #12 item 1): for each recipe of ``--recipes`` (default ``fast`` = EGNN 4x64 and
``qm9`` = EDM's 9x256, both batch 64) and each path of ``--paths``:
- ``fp32``: the PyG EGNN as ``multidiff train`` runs it;
- ``bf16``: ``train.precision=bf16`` through the Trainer's wrapper (linear layers in bf16; positions, distances and
  the coordinate updates stay fp32 because they never pass a linear layer: ``x_i - x_j``, ``||.||`` and the
  per-edge ``coord_diff * phi`` sum run in fp32, ``phi`` is cast up);
- ``compile``: ``torch.compile(backbone, dynamic=True)`` (inductor, C++ via gcc); ``compile_bf16`` both. If
  compilation fails the path is reported as failed with the reason, and the rest goes on (eager);
the bench trains on the same ``--batches`` pre-collated QM9 batches (data loading excluded, the same molecules for
every path), ``--rounds`` rounds of about ``--seconds`` s per path, the paths interleaved within a round so that a
busy machine slows all of them alike; ``train molecules/s`` is the median over rounds and ``train speed-up vs fp32``
the median of the per-round ratios. Sampling: ``pipeline.generate`` (the recipe's sampler) on ``--sample-batch``
molecules for ``--sample-probe`` steps, reported as molecules/s at the recipe's ``sample.steps`` (time per step
x steps; fp32 and compile are product paths, bf16 sampling is measured but not what ``multidiff sample`` does).
Compile time (first call plus recompilations during warm-up) is its own line. ``--ddp`` compares 1 process x N
threads with N processes x 1 thread (torchrun, gloo, the global batch split as ``multidiff train`` splits it), fp32,
alternating. ``edm code ratio`` divides the best EDM-size training molecules/s by ``--edm-code`` (6.9 molecules/s:
EDM's own code on these machines with tuned malloc, issue #12).

    OMP_NUM_THREADS=2 python bench/molecules_training.py --matrix --threads 2 [--recipes fast qm9]
        [--paths fp32 bf16 compile compile_bf16] [--seconds 6 --rounds 3] [--ddp]
"""

from __future__ import annotations

import argparse
import contextlib
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

from _common import emit  # noqa: E402
from molecules_sampling import emit_quality, sample_quality  # noqa: E402  (also puts the repo root on sys.path)

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

    from multidiff.pipeline import TrainingModule, build_denoiser, load_run_config
    from multidiff.registry import get_domain
    from multidiff.training import with_precision

    domain = get_domain("molecules")
    cfg = domain.resolve(load_run_config(domain, recipe, overrides))
    tc = cfg.train
    torch.manual_seed(tc.seed)
    denoiser = build_denoiser(domain, cfg).train()
    dataset = domain.build_dataset(cfg, "train")
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, collate_fn=domain.collate_fn(cfg),
                        num_workers=tc.num_workers, generator=torch.Generator().manual_seed(tc.seed))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    net = with_precision(TrainingModule(domain, denoiser), tc.precision, torch.device("cpu"))  # as the Trainer does

    molecules = atoms = done = 0
    losses: list[float] = []
    start = time.perf_counter()
    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                molecules = atoms = 0
                losses.clear()
                start = time.perf_counter()
            loss = net(batch)
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
        "seconds": seconds, "mean_loss": sum(losses) / len(losses), "batch": tc.batch_size, "precision": tc.precision,
        "params": sum(p.numel() for p in params), "peak_rss_mib": peak_rss_mib(),
    }


def speed_lines(r: dict[str, Any], setting: dict) -> None:
    emit("train molecules/s", setting, r["molecules_per_s"], "molecules/s")
    emit("train steps/s", setting, r["steps_per_s"], "steps/s")
    emit("peak RSS", setting, r["peak_rss_mib"], "MiB")


# --- throughput matrix (issue #12 item 1) -------------------------------------------------------------------------

PATHS = ("fp32", "bf16", "compile", "compile_bf16")
EDM_CODE_MOLECULES_PER_S = 6.9  # EDM's own training code at 9x256 on these machines, tuned malloc (issue #12)


class _Runner:
    """One training path of a recipe: model, optimizer and the module the Trainer would step."""

    def __init__(self, recipe: str, overrides: list[str], path: str, seed: int) -> None:
        from multidiff.pipeline import TrainingModule, build_denoiser, load_run_config
        from multidiff.registry import get_domain
        from multidiff.training import with_precision

        self.path = path
        bf16 = path.endswith("bf16")
        self.domain = get_domain("molecules")
        self.cfg = self.domain.resolve(
            load_run_config(self.domain, recipe, [*overrides, f"train.precision={'bf16' if bf16 else 'fp32'}"]))
        tc = self.cfg.train
        torch.manual_seed(seed)  # the same initial weights for every path
        self.denoiser = build_denoiser(self.domain, self.cfg).train()
        self.compile_error: str | None = None
        if path.startswith("compile"):
            self.denoiser.backbone = torch.compile(self.denoiser.backbone, dynamic=True)
        module = TrainingModule(self.domain, self.denoiser)
        self.net = with_precision(module, tc.precision, torch.device("cpu"))
        self.precision = "fp32" if self.net is module else "bf16"
        self.params = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf

    def uncompile(self, error: BaseException) -> None:
        """Fall back to the eager backbone after a failed compilation (the weights are shared)."""
        self.compile_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        self.denoiser.backbone = getattr(self.denoiser.backbone, "_orig_mod", self.denoiser.backbone)

    def step(self, batch: dict[str, Any]) -> float:
        loss = self.net(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        return float(loss.detach())

    def sample(self, num: int, steps: int, seed: int) -> None:
        from multidiff.pipeline import LoadedModel, generate

        model = LoadedModel(self.domain, self.cfg, self.denoiser, None, Path("."))
        request = self.domain.request(self.cfg, num, {}, seed=seed)
        self.denoiser.eval()
        try:
            with torch.no_grad(), (torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16"
                                   else contextlib.nullcontext()):
                generate(model, request, sampler=self.cfg.sample.sampler, steps=steps, grid=self.cfg.sample.grid,
                         generator=torch.Generator().manual_seed(seed))
        finally:
            self.denoiser.train()


def _fixed_batches(runner: _Runner, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` collated training batches (the same molecules for every path)."""
    from torch.utils.data import DataLoader

    tc = runner.cfg.train
    dataset = runner.domain.build_dataset(runner.cfg, "train")
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                        collate_fn=runner.domain.collate_fn(runner.cfg), generator=torch.Generator().manual_seed(seed))
    return [b for _, b in zip(range(count), loader)]


def _timed(fn: Any, seconds: float, min_calls: int = 2) -> tuple[int, float]:
    """Call ``fn(k)`` for k = 0, 1, ... until ``seconds`` have passed (at least ``min_calls`` times)."""
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn(calls)
        calls += 1
    return calls, time.perf_counter() - start


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def matrix(a: argparse.Namespace) -> None:
    """Training and sampling molecules/s per (recipe, path); see the module docstring."""
    best_edm = 0.0
    for recipe in a.recipes:
        runners: dict[str, _Runner] = {}
        for path in a.paths:
            runners[path] = _Runner(recipe, a.overrides, path, a.seed)
        first = next(iter(runners.values()))
        batches = _fixed_batches(first, a.batches, a.seed)
        num_molecules = sum(b["num_graphs"] for b in batches) / len(batches)
        base = {"recipe": recipe, "hidden": first.cfg.model.hidden, "layers": first.cfg.model.layers,
                "batch": first.cfg.train.batch_size, "threads": torch.get_num_threads(), "seconds": a.seconds,
                "rounds": a.rounds, "machine_busy_note": a.note}

        # warm-up: compilation (first call and the recompilations of the first batch shapes) is timed on its own
        for path, r in list(runners.items()):
            t0 = time.perf_counter()
            try:
                for b in batches[: a.matrix_warmup]:
                    r.step(b)
                if a.sample:
                    r.sample(a.sample_batch, 2, a.seed)
            except Exception as e:  # a compiler missing or failing: report it and continue eager
                if not path.startswith("compile"):
                    raise
                r.uncompile(e)
                print(f"{recipe}/{path}: torch.compile failed ({r.compile_error}); this path runs eager", file=sys.stderr)
                for b in batches[: a.matrix_warmup]:
                    r.step(b)
            if path.startswith("compile"):
                emit("compile + warm-up time", {**base, "path": path, "warmup_steps": a.matrix_warmup,
                                                "compiled": r.compile_error is None,
                                                **({"error": r.compile_error} if r.compile_error else {})},
                     time.perf_counter() - t0, "s")

        train: dict[str, list[float]] = {p: [] for p in runners}
        sample: dict[str, list[float]] = {p: [] for p in runners}
        steps = first.cfg.sample.steps
        for rnd in range(a.rounds):
            for path, r in runners.items():
                calls, secs = _timed(lambda k: r.step(batches[(rnd * 7 + k) % len(batches)]), a.seconds)
                train[path].append(calls * num_molecules / secs)
            if a.sample:
                for path, r in runners.items():
                    calls, secs = _timed(lambda k: r.sample(a.sample_batch, a.sample_probe, a.seed + k), a.seconds, 1)
                    per_step = secs / (calls * a.sample_probe)
                    sample[path].append(a.sample_batch / (per_step * steps))

        for path, r in runners.items():
            setting = {**base, "path": path, "precision": r.precision,
                       "compiled": path.startswith("compile") and r.compile_error is None,
                       "per_round": [round(v, 2) for v in train[path]]}
            mps = _median(train[path])
            emit("train molecules/s", setting, mps, "molecules/s")
            if path != "fp32" and "fp32" in train:
                emit("train speed-up vs fp32", setting,
                     _median([x / y for x, y in zip(train[path], train["fp32"])]), "x")
            if a.sample:
                s_setting = {**setting, "sampler": r.cfg.sample.sampler, "sample_steps": steps,
                             "probe_steps": a.sample_probe, "sample_batch": a.sample_batch,
                             "per_round": [round(v, 3) for v in sample[path]]}
                emit("sample molecules/s", s_setting, _median(sample[path]), "molecules/s")
                if path != "fp32" and "fp32" in sample:
                    emit("sample speed-up vs fp32", s_setting,
                         _median([x / y for x, y in zip(sample[path], sample["fp32"])]), "x")
            if r.cfg.model.hidden == 256 and r.cfg.model.layers == 9:
                best_edm = max(best_edm, mps)
        if a.ddp:
            ddp_compare(recipe, a, base)
        del runners
    if best_edm > 0:
        emit("edm code ratio", {"edm_code_molecules_per_s": a.edm_code, "ours_molecules_per_s": round(best_edm, 3),
                                "note": "ours measured now on this (busy) machine, EDM's code on an idle one"},
             best_edm / a.edm_code, "x")


def ddp_compare(recipe: str, a: argparse.Namespace, base: dict) -> None:
    """fp32 training: 1 process x N threads vs N processes x 1 thread (``--ddp-procs``; torchrun, gloo)."""
    nproc = a.ddp_procs
    threads = torch.get_num_threads()
    torch.set_num_threads(nproc)  # the single process gets the threads the processes get in all
    single: list[float] = []
    multi: list[float] = []
    r = _Runner(recipe, a.overrides, "fp32", a.seed)
    batches = _fixed_batches(r, a.batches, a.seed)
    num_molecules = sum(b["num_graphs"] for b in batches) / len(batches)
    for b in batches[: a.matrix_warmup]:
        r.step(b)
    for rnd in range(a.rounds):
        calls, secs = _timed(lambda k: r.step(batches[(rnd * 7 + k) % len(batches)]), a.seconds)
        single.append(calls * num_molecules / secs)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--ddp-worker", "--recipes", recipe, "--seconds", str(a.seconds),
               "--matrix-warmup", str(a.matrix_warmup), "--batches", str(a.batches), "--seed", str(a.seed), "--set", *a.overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            print(f"torchrun failed ({proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
            torch.set_num_threads(threads)
            return
        multi.append(lines[-1]["molecules_per_s"])
    setting = {**base, "path": "fp32", "processes": nproc, "threads_per_process": 1,
               "per_round_single": [round(v, 2) for v in single], "per_round_ddp": [round(v, 2) for v in multi]}
    emit(f"train molecules/s, 1 process x {nproc} threads", setting, _median(single), "molecules/s")
    emit(f"train molecules/s, {nproc} processes x 1 thread (torchrun gloo)", setting, _median(multi), "molecules/s")
    emit("train speed-up, processes vs threads", setting, _median([m / s for m, s in zip(multi, single)]), "x")
    torch.set_num_threads(threads)


def ddp_worker(a: argparse.Namespace) -> None:
    """One torchrun process: DDP training of the fp32 path on its share of the global batch; rank 0 prints."""
    from torch.nn.parallel import DistributedDataParallel

    from multidiff.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    env, _ = init_distributed(torch.device("cpu"))
    r = _Runner(a.recipes[0], a.overrides, "fp32", a.seed)
    batches = _fixed_batches(r, a.batches * env.world_size, a.seed)
    global_molecules = sum(b["num_graphs"] for b in batches) / len(batches)
    local = [_shard(b, env.rank, env.world_size) for b in batches]
    net = DistributedDataParallel(r.net)

    def step(k: int) -> None:
        loss = net(local[k % len(local)])
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(r.params, r.max_norm)
        r.opt.step()

    t0 = time.perf_counter()
    for k in range(a.matrix_warmup):
        step(k)
    # every rank must run the same number of steps (each one all-reduces): rank 0's estimate decides
    per_step = (time.perf_counter() - t0) / max(a.matrix_warmup, 1)
    count = torch.tensor([max(2, math.ceil(a.seconds / max(per_step, 1e-6)))])
    torch.distributed.broadcast(count, 0)
    calls = int(count)
    torch.distributed.barrier()
    start = time.perf_counter()
    for k in range(calls):
        step(k)
    secs = time.perf_counter() - start
    if env.rank == 0:
        print(json.dumps({"molecules_per_s": calls * global_molecules / secs}), flush=True)
    destroy_distributed()


def _shard(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s share of a collated molecules batch: molecules rank, rank + world, ..."""
    keep = torch.arange(batch["num_graphs"])[rank::world]
    atoms = torch.isin(batch["batch"], keep)
    remap = torch.full((batch["num_graphs"],), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    out = dict(batch)
    out["x"], out["batch"], out["num_graphs"] = batch["x"][atoms], remap[batch["batch"][atoms]], len(keep)
    if "properties" in batch:
        out["properties"] = batch["properties"][keep]
    return out


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
    m = p.add_argument_group("throughput matrix (--matrix)")
    m.add_argument("--matrix", action="store_true", help="training/sampling molecules/s per recipe and path")
    m.add_argument("--recipes", nargs="+", default=["fast", "qm9"], help="recipes (default: fast = 4x64, qm9 = 9x256)")
    m.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    m.add_argument("--seconds", type=float, default=6.0, help="seconds per path and round")
    m.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    m.add_argument("--matrix-warmup", type=int, default=3, help="untimed steps per path (compilation happens here)")
    m.add_argument("--batches", type=int, default=8, help="pre-collated training batches cycled through")
    m.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True, help="also sampling molecules/s")
    m.add_argument("--sample-probe", type=int, default=4, help="sampler steps timed per sampling call")
    m.add_argument("--ddp", action="store_true", help="also 1 process x N threads vs N processes (torchrun, gloo)")
    m.add_argument("--ddp-procs", type=int, default=2, help="N for --ddp")
    m.add_argument("--edm-code", type=float, default=EDM_CODE_MOLECULES_PER_S,
                   help="EDM's own code, molecules/s at 9x256 (issue #12)")
    m.add_argument("--note", default="", help="free text put into every setting (e.g. 'two trainings running')")
    m.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ddp_worker:
        ddp_worker(a)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.matrix:
        if a.matrix_warmup < 1:
            raise SystemExit("--matrix-warmup must be >= 1")
        matrix(a)
        return
    if a.steps < 1 or a.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

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
