"""The ``multidiff`` command line: train | sample | evaluate | data | info, each taking a DOMAIN."""

from __future__ import annotations

import math
import os
import platform
import signal
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Optional

import typer

from .files import dumps_json, write_json

# glibc returns freed large blocks to the OS and re-zeroes them on every training step; keeping them
# mapped speeds large-tensor torch code up 1.8-3.2x on CPU (see bench/*.py). Opt out: MULTIDIFF_MALLOC=system.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

app = typer.Typer(
    name="multidiff",
    help="Conditional diffusion for audio waveforms and 3D molecules.\n\n"
    "Examples:\n\n"
    "  multidiff train audio                         # default recipe, embedded data\n\n"
    "  multidiff train toy train.steps=400 --out runs/toy\n\n"
    "  multidiff sample toy --checkpoint runs/toy --num 1000 --condition label=3\n\n"
    "  multidiff evaluate toy runs/toy/samples\n\n"
    "  multidiff info",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DomainArg = Annotated[str, typer.Argument(help="Domain name: audio, molecules, toy (see `multidiff info`).")]
ConfigOpt = Annotated[
    Optional[str], typer.Option("--config", "-c", help="Recipe name in configs/DOMAIN/ (e.g. 'fast') or a YAML path.")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or auto.")]


def _console():  # rich is imported lazily so `--help` stays fast
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # soft_wrap: never break a line (or a path) at the terminal width


def _fail(message: str, code: int = 2) -> None:
    """Print ``error: MESSAGE`` to stderr, unwrapped and without markup, and exit with ``code``."""
    from rich.text import Text

    _console().print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(code)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .files import DirLockedError

    return (ConfigError, CheckpointError, DirLockedError, ValueError, FileNotFoundError, FileExistsError,
            PermissionError, KeyError)


@app.command()
def train(
    domain: DomainArg,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.lr=3e-4 model.channels=64.")] = None,
    config: ConfigOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (checkpoints, log.jsonl, config.yaml).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest good checkpoint in --out.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Overrides train.seed.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Wall-clock budget; overrides train.max_minutes.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Step budget; overrides train.steps.")] = None,
    device: DeviceOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train DOMAIN from a recipe; checkpoints carry the resolved config, so sampling needs only them.

    Examples: `multidiff train toy train.steps=400 --out runs/toy`;
    `multidiff train molecules --config fast --max-minutes 30`;
    `torchrun --standalone --nproc_per_node=2 -m multidiff.cli train toy --out runs/ddp`.
    """
    from . import pipeline
    from .registry import get_domain

    try:
        dom = get_domain(domain)
        extra = list(overrides or [])
        if seed is not None:
            extra.append(f"train.seed={seed}")
        if max_minutes is not None:
            extra.append(f"train.max_minutes={max_minutes}")
        if steps is not None:
            extra.append(f"train.steps={steps}")
        cfg = pipeline.load_run_config(dom, config, extra)
        run_dir = out or Path("runs") / f"{domain}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = pipeline.train(dom, cfg, run_dir, resume=resume, device=_resolve_device(device), progress=progress)
    except _user_errors() as e:
        _fail(str(e))
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(dumps_json({"run": str(run_dir), "step": result.step, "loss": result.loss, "stopped": result.stopped,
                          "checkpoint": str(result.checkpoint) if result.checkpoint else None}))
    if result.stopped == "interrupted":  # saved and stopped cleanly; the exit status still says which signal
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted at step {result.step}; continue with: multidiff train {domain} --out {run_dir} --resume "
                  f"(and the same --config / overrides)", file=sys.stderr)
        raise typer.Exit(128 + int(result.signal or signal.SIGTERM))


def _parse_conditions(items: list[str] | None, label: str | None = None) -> dict[str, str]:
    """``--condition KEY=VALUE`` items (and ``--label V``, short for label=V) as a dict; malformed items are errors."""
    conditions = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--condition {item!r} is malformed: expected KEY=VALUE (e.g. label=7 or alpha=80)")
        conditions[key.strip()] = value.strip()
    if label is not None:
        if "label" in conditions:
            raise ValueError(f"--label {label!r} and --condition label={conditions['label']}: give the label once")
        conditions["label"] = label.strip()
    return conditions


def _earlier_outputs(dom, out: Path, overwrite: bool) -> list[Path]:
    """``--out`` must be empty unless ``--overwrite``; returns the earlier outputs of ``dom`` there (its
    ``output_patterns`` and metrics.json), which ``--overwrite`` replaces."""
    from .files import LOCK_FILE

    present = sorted(p for p in out.iterdir() if p.name != LOCK_FILE)
    if present and not overwrite:
        shown = ", ".join(p.name for p in present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise FileExistsError(f"--out {out} is not empty ({shown}); pass --overwrite to replace the {dom.name} samples "
                              f"there, or choose an empty or new directory")
    patterns = (*dom.output_patterns, METRICS_FILE)
    return [p for p in present if p.is_file() and any(p.match(pattern) for pattern in patterns)]


SAMPLE_OVERRIDABLE = ("data", "sample")
METRICS_FILE = "metrics.json"


def _override_loaded(cfg, overrides: list[str] | None, source: str):
    """Dotted overrides of a checkpoint's embedded config; only data.* and sample.* (the weights fix the rest)."""
    if not overrides:
        return cfg
    from .config import ConfigError, apply_overrides, config_to_dict

    bad = [o for o in overrides if o.partition("=")[0].strip().split(".")[0] not in SAMPLE_OVERRIDABLE]
    if bad:
        raise ConfigError(f"override(s) {bad}: only data.* and sample.* can be changed for a trained checkpoint "
                          f"(its weights fix model, diffusion and train)")
    return apply_overrides(type(cfg), config_to_dict(cfg), overrides, source=source)


@app.command()
def sample(
    domain: DomainArg,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted data.* / sample.* overrides of the checkpoint's config, e.g. data.predictor=runs/pred.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Run dir, checkpoint dir or .safetensors; default: the shipped one.")] = None,
    num: Annotated[Optional[int], typer.Option(help="How many samples (default: the recipe's sample.num).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (grid intervals).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ancestral, ddim, euler, euler_maruyama, heun, dpmpp_2m or adaptive (picks its own steps; metrics get sampler_nfe).")] = None,
    grid: Annotated[Optional[str], typer.Option(help="Step grid: uniform, logsnr or karras.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (1 = plain conditional); applied for t in sample.guidance_interval when the recipe sets one.")] = None,
    gradient_scale: Annotated[float, typer.Option(help="Gradient guidance toward the --condition targets through the domain's predictor (molecules: data.predictor); 0 = off.")] = 0.0,
    rtol: Annotated[Optional[float], typer.Option(help="Relative error tolerance of each step of --sampler adaptive (default: the recipe's sample.rtol, 0.003); looser = fewer network passes. An error with another sampler.")] = None,
    atol: Annotated[Optional[float], typer.Option(help="Absolute error tolerance of each step of --sampler adaptive (default: the recipe's sample.atol, 0.003). An error with another sampler.")] = None,
    condition: Annotated[Optional[list[str]], typer.Option("--condition", help="KEY=VALUE condition (repeatable).")] = None,
    label: Annotated[Optional[str], typer.Option("--label", help="Short for --condition label=VALUE (an index or a class name).")] = None,
    inpaint: Annotated[Optional[Path], typer.Option(help="A file whose known part is kept (audio WAV, molecule SDF/XYZ fragment).")] = None,
    mask: Annotated[Optional[str], typer.Option(help="Span to regenerate for --inpaint, e.g. 0.3:0.5 (seconds).")] = None,
    out: Annotated[Path, typer.Option(help="Output directory (must be empty, see --overwrite).")] = Path("samples"),
    overwrite: Annotated[bool, typer.Option(help="Sample into a non-empty --out: first delete the domain's earlier sample files and metrics.json there (other files stay).")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same samples on CPU).")] = 0,
    jobs: Annotated[Optional[Path], typer.Option(help="A JSONL file of requests, one per line (id, num, seed, label, conditions, steps, ...): each job goes to --out/ID atomically and into --out/manifest.jsonl; re-running resumes; sharded over torchrun ranks.")] = None,
    precision: Annotated[str, typer.Option(help="auto (default: bf16 for a domain measured faster in it, audio, on a CPU with AVX-512 BF16/AMX; else fp32), fp32, bf16 (autocast; fp32 with one warning on a CPU without AVX-512 BF16/AMX) or int8 (dynamic quantization of linear layers, CPU); --jobs run in it too (each job's manifest params name it when not fp32). See README 'when to use which'.")] = "auto",
    device: DeviceOpt = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Sample DOMAIN from a checkpoint; writes the domain's files and metrics.json into --out (empty, or --overwrite).

    Examples: `multidiff sample toy --checkpoint runs/toy --num 1000 --condition label=3`;
    `multidiff sample audio --label 7 --num 16 --steps 50 --guidance 2`;
    `multidiff sample molecules data.predictor=runs/pred --condition alpha=80 --gradient-scale 1`;
    `multidiff sample toy --checkpoint runs/toy --jobs jobs.jsonl --out batch/` (resumable batch jobs).
    """
    from . import pipeline
    from .files import DirLock, check_writable_dir
    from .registry import get_domain

    if sampler is not None:
        try:
            _check_tolerance_flags(sampler, rtol, atol)  # before any work when --sampler says it already
        except ValueError as e:
            _fail(str(e))
    if jobs is not None:
        _sample_jobs(domain, overrides, checkpoint, jobs, out, num=num, steps=steps, sampler=sampler, grid=grid,
                     guidance=guidance, gradient_scale=gradient_scale, rtol=rtol, atol=atol, seed=seed,
                     precision=precision, device=device,
                     given={"--condition": condition, "--label": label, "--inpaint": inpaint, "--mask": mask,
                            "--overwrite": overwrite or None})
        return
    lock = DirLock(out, "multidiff sample")
    try:
        dev = _resolve_device(device)
        dom = get_domain(domain)
        conditions = _parse_conditions(condition, label)
        check_writable_dir(out, "--out")  # before any work, not after all the sampling
        lock.acquire()  # a second `multidiff sample --out` here stops at once, naming this process
        earlier = _earlier_outputs(dom, out, overwrite)
        ckpt = checkpoint if checkpoint is not None else _shipped_checkpoint(domain)
        model = pipeline.load_model(ckpt, device=dev)
        if model.domain.name != domain:
            _fail(f"{ckpt}: this checkpoint is for domain {model.domain.name!r}, not {domain!r}")
        model.cfg = _override_loaded(model.cfg, overrides, f"{model.path} (embedded config)")
        from .inference import resolve_precision, set_precision

        used_precision = set_precision(model.denoiser, resolve_precision(precision, model.domain, dev), dev)
        n = num if num is not None else model.cfg.sample.num
        if n < 1:
            raise ValueError(f"--num must be >= 1, got {n}")
        _check_tolerance_flags(sampler if sampler is not None else model.cfg.sample.sampler, rtol, atol)
        settings = pipeline.sampler_settings(model, sampler=sampler, steps=steps, grid=grid, guidance=guidance,
                                             gradient_scale=gradient_scale, rtol=rtol, atol=atol)

        def clear_earlier() -> None:  # --overwrite: the earlier run's files go only now that the new samples exist
            for path in earlier:
                path.unlink(missing_ok=True)

        total = settings.steps * pipeline.num_sampler_calls(model, n)
        used_nfe: dict[int, int] = {}  # per sampler call: the NFE a sampler that picks its own steps reports

        from .progress import progress_bar

        with progress_bar(f"sampling {n} x {domain}", total, enabled=progress and sys.stderr.isatty()) as bar:
            def record(info, done=0):
                if info.nfe is not None:
                    used_nfe[done] = info.nfe
                bar.update(completed=done + info.i + 1)

            files, metrics = pipeline.sample_to_dir(model, n, conditions, settings, out, inpaint=inpaint, mask=mask,
                                                    seed=seed, callback=record, before_write=clear_earlier)
        if used_nfe:  # --sampler adaptive: the network passes it chose, summed over its sampler calls
            metrics["sampler_nfe"] = sum(used_nfe.values())
        if precision not in ("fp32", "auto") or used_precision != "fp32":
            metrics["precision"] = used_precision
        if "precision" in metrics or used_nfe:
            write_json(out / METRICS_FILE, metrics)
    except _user_errors() as e:
        _fail(str(e))
        return
    finally:
        lock.release()
    print(dumps_json({"out": str(out), "files": [str(f) for f in files], "metrics": metrics}))


def _check_tolerance_flags(sampler: str, rtol: float | None, atol: float | None) -> None:
    """``--rtol`` / ``--atol`` are the tolerances of ``--sampler adaptive``: a ValueError naming the flag otherwise."""
    given = [flag for flag, value in (("--rtol", rtol), ("--atol", atol)) if value is not None]
    if given and sampler != "adaptive":
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{' and '.join(given)}: {verb} to --sampler adaptive only (the error tolerance of its steps); "
                         f"this run samples with {sampler!r}: drop {' and '.join(given)} or pass --sampler adaptive")
    from .registry import check_tolerances

    check_tolerances(rtol, atol, prefix="--")


def _sample_jobs(domain: str, overrides: list[str] | None, checkpoint: Path | None, jobs_file: Path, out: Path, *,
                 num: int | None, steps: int | None, sampler: str | None, grid: str | None, guidance: float | None,
                 gradient_scale: float, rtol: float | None, atol: float | None, seed: int, precision: str, device: str,
                 given: dict[str, object]) -> None:
    """``multidiff sample --jobs``: resumable batch jobs (``multidiff.jobs``), sharded over torchrun ranks; the model
    runs in ``--precision`` resolved as for one ``multidiff sample`` (auto: the domain's ``sample_precision``)."""
    import dataclasses

    import torch

    from . import pipeline
    from .distributed import broadcast_object, destroy_distributed, init_distributed, resolve_device
    from .files import DirLock, check_writable_dir
    from .jobs import read_jobs, run_jobs

    env, created = init_distributed(torch.device(_resolve_device(device)))
    lock = DirLock(out, "multidiff sample --jobs") if env.is_main else None
    summary = None
    try:
        clash = [flag for flag, value in given.items() if value]
        if clash:
            raise ValueError(f"{', '.join(clash)}: not with --jobs (give them per job in {jobs_file}; each job "
                             f"resumes into --out/ID)")
        if num is not None and num < 1:
            raise ValueError(f"--num must be >= 1, got {num}")
        job_list = read_jobs(jobs_file, seed=seed)
        defaults = {"steps": steps, "sampler": sampler, "grid": grid, "guidance": guidance, "rtol": rtol, "atol": atol}
        job_list = [dataclasses.replace(j, **{k: v for k, v in defaults.items() if v is not None and getattr(j, k) is None},
                                        gradient_scale=j.gradient_scale or gradient_scale) for j in job_list]
        error = None
        if lock is not None:
            try:
                check_writable_dir(out, "--out")
                lock.acquire()
            except _user_errors() as e:
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        ckpt = checkpoint if checkpoint is not None else _shipped_checkpoint(domain)
        dev = str(resolve_device(_resolve_device(device), env))
        model = pipeline.load_model(ckpt, device=dev)
        if model.domain.name != domain:
            raise ValueError(f"{ckpt}: this checkpoint is for domain {model.domain.name!r}, not {domain!r}")
        model.cfg = _override_loaded(model.cfg, overrides, f"{model.path} (embedded config)")
        flags = [flag for flag, value in (("--rtol", rtol), ("--atol", atol)) if value is not None]
        other = [j for j in job_list if (j.sampler or model.cfg.sample.sampler) != "adaptive"]
        if flags and other:
            raise ValueError(f"{' and '.join(flags)}: the default of every job, so for sampler 'adaptive' only; job "
                             f"{other[0].id!r} (line {other[0].line}) samples with "
                             f"{other[0].sampler or model.cfg.sample.sampler!r}: give rtol / atol per job in {jobs_file}")
        from .inference import resolve_precision, set_precision

        set_precision(model.denoiser, resolve_precision(precision, model.domain, dev), dev)  # recorded per job
        summary = run_jobs(model, job_list, out, default_num=num)
    except _user_errors() as e:
        _fail(str(e) if env.is_main else f"rank {env.rank}: {e}")
        return
    finally:
        if lock is not None:
            lock.release()
        if created:
            destroy_distributed()
    if env.is_main:
        print(dumps_json(summary))


def _shipped_checkpoint(domain: str) -> Path:
    path = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / f"{domain}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped checkpoint for {domain!r} at {path}; pass --checkpoint RUN_DIR (train one with `multidiff train {domain}`)")
    return path


@app.command()
def evaluate(
    domain: DomainArg,
    path: Annotated[Path, typer.Argument(help="Samples written by `multidiff sample` (a file or directory).")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. data.predictor=runs/pred.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Take the data settings from this run's config.")] = None,
    config: ConfigOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the metrics JSON here too.")] = None,
) -> None:
    """Compute DOMAIN's metrics on samples; prints JSON.

    Examples: `multidiff evaluate toy samples/`; `multidiff evaluate molecules samples/molecules.sdf`;
    `multidiff evaluate molecules samples/ data.predictor=runs/pred` (property MAE with EDM's baselines).
    """
    from . import pipeline
    from .registry import get_domain

    try:
        dom = get_domain(domain)
        if checkpoint is not None:
            loaded = pipeline.load_model(checkpoint)
            cfg = _override_loaded(loaded.cfg, overrides, f"{loaded.path} (embedded config)")
        else:
            cfg = pipeline.load_run_config(dom, config, list(overrides or []))
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        metrics = dom.evaluate(path, cfg)
        if out is not None:
            write_json(out, metrics)
    except _user_errors() as e:
        _fail(str(e))
        return
    print(dumps_json(metrics))


@app.command()
def distill(
    domain: DomainArg,
    checkpoint: Annotated[Path, typer.Option(help="The teacher: run dir, checkpoint dir or .safetensors of DOMAIN.")],
    steps: Annotated[int, typer.Option(help="The student's DDIM steps (one network pass each; guidance distilled in).")] = 4,
    out: Annotated[Path, typer.Option(help="Run directory for the student checkpoint.")] = Path("runs/distilled"),
    rounds: Annotated[Optional[int], typer.Option(help="Halvings (default: teacher grid >= the checkpoint's sample.steps).")] = None,
    iters: Annotated[int, typer.Option(help="Training iterations per halving.")] = 300,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-4,
    batch_size: Annotated[Optional[int], typer.Option(help="Default: the checkpoint's train.batch_size.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Teacher CFG scale to distil in (default: the checkpoint's sample.guidance).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    max_minutes: Annotated[Optional[float], typer.Option(help="Wall-clock budget for training: each round gets an equal share of the time left (and stops at --iters at the latest).")] = None,
    grid: Annotated[Optional[str], typer.Option(help="The student's step grid: uniform, logsnr or karras (default: the checkpoint's sample.grid).")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Progressive distillation (Salimans & Ho 2022) of a checkpoint into a few-step student with CFG distilled in;
    the student is an ordinary checkpoint (`multidiff sample DOMAIN --checkpoint RUN` samples it with its own steps).

    Example: `multidiff distill toy --checkpoint runs/toy --steps 2 --out runs/toy-2step`.
    """
    from . import pipeline
    from .distill import distill as run_distill

    try:
        model = pipeline.load_model(checkpoint, device=_resolve_device(device))
        if model.domain.name != domain:
            raise ValueError(f"--checkpoint {checkpoint}: this checkpoint is for domain {model.domain.name!r}, "
                             f"not {domain!r}; distil it with `multidiff distill {model.domain.name} ...`")
        path = run_distill(model, steps, out, rounds=rounds, iters=iters, batch_size=batch_size, lr=lr,
                           guidance=guidance, grid=grid, seed=seed, max_minutes=max_minutes, log=lambda rec: print(dumps_json(rec), file=sys.stderr))
    except _user_errors() as e:
        _fail(str(e))
        return
    print(dumps_json({"out": str(out), "checkpoint": str(path), "steps": steps}))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Run dir, checkpoint dir or .safetensors file.")],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="data.* / sample.* changes to the embedded config, e.g. sample.guidance=3.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Export the raw weights instead of the EMA weights.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Storage precision of the weights: fp32, fp16 (half the size; loading casts back to fp32) or bf16.")] = "fp32",
) -> None:
    """Write one self-contained inference file (EMA weights + run config) for sharing or shipping.

    Example: `multidiff export runs/audio data/checkpoints/audio.safetensors sample.guidance=3`.
    """
    from .checkpoint import export_weights
    from .config import config_to_dict
    from .pipeline import load_run

    try:
        run = load_run(checkpoint)
        ckpt = run.checkpoint
        cfg = _override_loaded(run.cfg, overrides, f"{ckpt.path} (embedded config)")
        path = export_weights(ckpt, out, config_to_dict(cfg), prefer_ema=not raw, dtype=dtype)
    except _user_errors() as e:
        _fail(str(e))
        return
    print(dumps_json({"out": str(path), "bytes": path.stat().st_size, "step": ckpt.step}))


@app.command()
def data(
    domain: DomainArg,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides of the data section.")] = None,
    config: ConfigOpt = None,
    watch: Annotated[bool, typer.Option(help="Keep polling the data folder and bring the prepared cache up to date on every change (one JSON line per change).")] = False,
    interval: Annotated[float, typer.Option(help="--watch: seconds between polls.")] = 2.0,
    watch_seconds: Annotated[Optional[float], typer.Option(help="--watch: stop after this many seconds (default: until interrupted).")] = None,
) -> None:
    """Prepare / cache DOMAIN's data for a recipe (e.g. synthesise the spoken digits, convert QM9).

    File sources (audio fsdd / speechcommands / folder) keep a content index: a second run reprocesses only added
    and changed files, drops removed ones and prints what changed (`changes`). Example:
    `multidiff data audio data.source=folder data.root=clips/ --watch --interval 5`.
    """
    from . import pipeline
    from .registry import get_domain

    try:
        dom = get_domain(domain)
        cfg = pipeline.load_run_config(dom, config, list(overrides or []))
        summary = dom.prepare_data(cfg)
        print(dumps_json(summary, fallback=str), flush=True)
        if watch:
            from .datacache import watch as poll

            if "changes" not in summary:
                raise ValueError(f"--watch: this {domain} data source keeps no content index (change data capture is "
                                 f"for file sources, e.g. data.source=folder data.root=DIR)")
            if not interval > 0:
                raise ValueError(f"--interval must be > 0 seconds, got {interval}")
            poll(lambda: dom.prepare_data(cfg), interval=interval, max_seconds=watch_seconds,
                 on_change=lambda s: print(dumps_json(s, fallback=str), flush=True))
    except _user_errors() as e:
        _fail(str(e))
        return
    except KeyboardInterrupt:
        return


@app.command()
def serve(
    checkpoint: Annotated[Optional[list[str]], typer.Option(help="DOMAIN=PATH (repeatable); default: the shipped audio and molecules checkpoints.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most samples in one sampler call (1 = no batching).")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a sampler call waits for batch-mates, counted from the oldest sample's arrival (--wait-from).")] = 20.0,
    wait_from: Annotated[str, typer.Option(help="arrival (default): --max-wait-ms counts from the oldest sample's arrival; idle: from the later of that and the worker becoming free.")] = "arrival",
    max_queue: Annotated[int, typer.Option(help="Most samples waiting; more answers 429 with Retry-After.")] = 256,
    max_num: Annotated[int, typer.Option(help="Most samples per request.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="Largest inpainting upload.")] = 5.0,
    max_figures: Annotated[int, typer.Option(help="Recent samples whose picture (spectrogram / molecule PNG, rendered on first GET of its figure_url) stays fetchable.")] = 1024,
    exact: Annotated[bool, typer.Option(help="Pad every sampler call to --max-batch samples: a sample is bit-identical alone or batched (costs a full batch at low load).")] = False,
    precision: Annotated[str, typer.Option(help="As for `multidiff sample`, per served domain: auto (default: the domain's measured choice, audio bf16 on a CPU with AVX-512 BF16/AMX, else fp32), fp32, bf16 or int8. GET /v1/domains and every answer say which.")] = "auto",
    device: DeviceOpt = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve checkpoints over HTTP: POST /v1/DOMAIN/samples (JSON or streamed events), a web page at /, /metrics.

    Example: `multidiff serve --checkpoint audio=runs/audio --port 8000 --max-batch 16 --max-wait-ms 20`, then
    `curl -s localhost:8000/v1/audio/samples -d '{"label": 7, "num": 2, "steps": 10}'`.
    """
    try:
        from .serve import ServeConfig, run, shipped_checkpoint
    except ImportError as e:
        _fail(f"multidiff serve needs fastapi, uvicorn and prometheus_client ({e}); install with pip install -e '.[dev]'")
        return
    try:
        if checkpoint:
            ckpts = {}
            for item in checkpoint:
                name, sep, path = item.partition("=")
                if not sep or not name or not path:
                    raise ValueError(f"--checkpoint {item!r}: expected DOMAIN=PATH (e.g. audio=runs/audio)")
                ckpts[name.strip()] = Path(path.strip())
        else:
            ckpts = {d: shipped_checkpoint(d) for d in ("audio", "molecules") if shipped_checkpoint(d).is_file()}
            if not ckpts:
                raise FileNotFoundError("no shipped checkpoints found; pass --checkpoint DOMAIN=PATH")
        config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, wait_from=wait_from, max_queue=max_queue, max_num=max_num,
                             max_upload_bytes=int(max_upload_mb * 2**20), max_figures=max_figures, exact=exact)
        run(ckpts, host=host, port=port, device=_resolve_device(device), config=config, log_level=log_level,
            precision=precision)
    except _user_errors() as e:
        _fail(str(e))


@app.command()
def info() -> None:
    """Registered domains, schedules, samplers, grids and installed versions."""
    from .registry import available_domains
    from .samplers import SAMPLERS
    from .schedules import GRIDS, SCHEDULES

    versions = {}
    for pkg in ("multidiff", "torch", "torchaudio", "torch-geometric", "rdkit", "numpy", "safetensors", "espeakng-loader"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    print(dumps_json({
        "domains": available_domains(),
        "schedules": sorted(SCHEDULES),
        "samplers": sorted(SAMPLERS),
        "grids": sorted(GRIDS),
        "versions": versions,
        "python": platform.python_version(),
        "malloc_tuning": os.environ.get("GLIBC_TUNABLES") == MALLOC_TUNABLES,
    }, indent=2))


def _maybe_tune_malloc() -> None:
    """Re-exec once with glibc malloc tunables set (the process keeps its PID, so torchrun is unaffected)."""
    if os.environ.get("MULTIDIFF_MALLOC", "tuned") != "tuned" or "GLIBC_TUNABLES" in os.environ:
        return
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "multidiff.cli", *sys.argv[1:]], env)
    except OSError:
        return


def main() -> None:
    """Console-script entry point."""
    _maybe_tune_malloc()
    app()


if __name__ == "__main__":
    main()
