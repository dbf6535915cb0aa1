"""One Trainer for any `nn.Module` + loss function: AdamW, warm-up + cosine LR, EMA, clipping, bf16 autocast,
gradient accumulation, resumable atomic checkpoints, JSONL (+TensorBoard) logs, rich progress, torchrun DDP.

Batch semantics: `batch_size` is the *global* micro-batch. Under torchrun each of the W processes takes its own
`batch_size / W` slice of it, so one config trains the same model (up to float rounding) on 1 or W processes.
One optimizer step consumes `batch_size * grad_accum` samples.

Reproducibility: all randomness of `loss_fn` must use the global torch RNG (and/or numpy / `random`); those states,
the optimizer, LR schedule, EMA and data position (epoch, batch within epoch) are checkpointed, so a run resumed
from any checkpoint ends bit-identical to one that was never interrupted (same machine, same world size).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, default_collate

from multidiff import checkpoint as ckpt_io
from multidiff import resume as resume_io
from multidiff.config import config_to_dict, config_to_yaml
from multidiff.distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    destroy_distributed,
    dist_env,
    init_distributed,
    resolve_device,
)
from multidiff.files import DirLock, atomic_write, dumps_json
from multidiff.progress import progress_bar
from multidiff.resume import STATE_VERSION, seed_everything  # noqa: F401  (STATE_VERSION: re-exported)

__all__ = ["TrainConfig", "TrainResult", "Trainer", "NonFiniteLossError", "lr_factor", "seed_everything"]

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainConfig:
    """Optimization, budget, logging and checkpointing settings of a training run."""

    steps: int = 10_000
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile the model's compile_target (the backbone) for training; eager if it fails
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0
    seed: int = 0
    num_workers: int = 0
    init: str | None = None  # warm start: a checkpoint (run dir or .safetensors) whose (EMA) weights seed a new run

    def __post_init__(self) -> None:
        """Reject values no run could use."""
        checks = [
            ("steps", self.steps >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("ema_decay", 0.0 <= self.ema_decay <= 1.0, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, ">= 0 (0 keeps all)"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("max_minutes", self.max_minutes is None or self.max_minutes > 0, "> 0 or null"),
        ]
        bad = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, ok, rule in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))


@dataclass
class TrainResult:
    """What `Trainer.fit` returns."""

    step: int
    loss: float | None
    elapsed_s: float
    stopped: Literal["steps", "time", "interrupted"]
    checkpoint: Path | None
    log_path: Path | None
    signal: int | None = None  # the signal that stopped an 'interrupted' run (SIGINT 2, SIGTERM 15)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM sent to the whole process group (a terminal's Ctrl-C, Slurm, kill
    -PGID): the trainer finishes its step, saves, then stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignals:
    """SIGINT / SIGTERM while training: finish the step, save a checkpoint and stop ('interrupted'); a second SIGINT
    aborts at once (the last saved checkpoint stays). Installed only from the main thread, restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler that prints while the main thread is printing raises "reentrant call"
        os.write(2, f"multidiff train: {signal.Signals(signum).name} - stopping after this step with a checkpoint "
                    f"(Ctrl-C again to abort at once)\n".encode())

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler installed from C, which Python cannot re-install
                signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; training stops before the bad update is applied."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier for optimizer update number `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- data ---------------------------------------------------------------------------------------------------------


class _ShardedBatches:
    """Infinite index batches: epoch e is randperm(seed + e); each global batch is split into per-rank slices."""

    def __init__(self, n: int, global_batch: int, env: DistEnv, seed: int, epoch: int, index: int) -> None:
        self.n, self.global_batch, self.env, self.seed = n, global_batch, env, seed
        self.epoch, self.index = epoch, index
        self.per_epoch = n // global_batch
        self.per_rank = global_batch // env.world_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch, index = self.epoch, self.index
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for i in range(index, self.per_epoch):
                start = i * self.global_batch + self.env.rank * self.per_rank
                yield order[start : start + self.per_rank].tolist()
            epoch, index = epoch + 1, 0


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (in dicts/lists/tuples, or objects with `.to`) to a device."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: _to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


class _DataStream:
    """Batches in a deterministic order that depends only on (seed, epoch, index), resumable at any batch."""

    def __init__(
        self,
        dataset: Dataset,
        cfg: TrainConfig,
        env: DistEnv,
        collate_fn: Callable[[list[Any]], Any] | None,
        device: torch.device,
        epoch: int,
        index: int,
    ) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError("Trainer needs a map-style dataset with __len__ and __getitem__")
        n = len(dataset)  # type: ignore[arg-type]
        if n < cfg.batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch (train.batch_size={cfg.batch_size})")
        if index >= n // cfg.batch_size:  # resumed on a smaller data set: its saved position is past this epoch's end
            epoch, index = epoch + 1, 0
        sampler = _ShardedBatches(n, cfg.batch_size, env, cfg.seed, epoch, index)
        self.per_epoch = sampler.per_epoch
        self.epoch, self.index = epoch, index
        self.device = device
        self.loader = DataLoader(
            dataset,
            batch_sampler=sampler,  # type: ignore[arg-type]
            collate_fn=collate_fn or default_collate,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),  # keeps DataLoader off the global RNG
            worker_init_fn=_ignore_stop_signals if cfg.num_workers > 0 else None,
        )
        self._it: Iterator[Any] | None = iter(self.loader)

    def next(self) -> Any:
        """The next micro-batch on the device; advances the position."""
        assert self._it is not None
        batch = next(self._it)
        self.index += 1
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return _to_device(batch, self.device)

    def position(self) -> dict[str, int]:
        """(epoch, batch index within epoch) of the next batch to be consumed."""
        return {"epoch": self.epoch, "index": self.index}

    def close(self) -> None:
        """Stop loader workers."""
        self._it = None


# --- precision ----------------------------------------------------------------------------------------------------


def _to_fp32(out: Any) -> Any:
    """Cast low-precision floating tensors in a (nested) output to float32."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float64 else out
    if isinstance(out, Mapping):
        return type(out)({k: _to_fp32(v) for k, v in out.items()})  # type: ignore[call-arg]
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(_to_fp32(v) for v in out)
    return out


class _AutocastForward(nn.Module):
    """Runs the wrapped module's forward under bf16 autocast and returns fp32 outputs (so the loss is fp32)."""

    def __init__(self, module: nn.Module, device_type: str) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Autocast forward, fp32 result."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        return _to_fp32(out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX); without, bf16 autocast is emulated and slow."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def with_precision(net: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The module the Trainer steps for ``train.precision``: ``net`` itself for fp32; for bf16 ``net`` under bf16
    autocast with fp32 outputs, or ``net`` itself (fp32, with one warning) on a CPU without native bf16."""
    if precision != "bf16":
        return net
    if device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("train.precision=bf16: this CPU has neither AVX-512 BF16 nor AMX, so bf16 would be emulated "
                    "(slower than fp32); training in fp32")
        return net
    return _AutocastForward(net, device.type)


class compiled_forward:
    """Context: ``module``'s forward runs through ``torch.compile`` (inductor, dynamic shapes) for this instance only.

    The module's parameters, ``state_dict`` and any copy made before (the EMA) are untouched. If compiling or running
    the compiled code fails while eager succeeds on the same input (no C++ compiler, an unsupported op), the module
    stays eager from then on and says so once; an error eager raises too is the model's own and propagates. A failure
    compiling the backward pass (torch may compile it lazily, inside ``backward()``) is not caught."""

    def __init__(self, module: nn.Module, *, dynamic: bool = True) -> None:
        self.module, self.dynamic = module, dynamic
        self.failed: str | None = None
        self._previous: Any = None

    def __enter__(self) -> compiled_forward:
        module, eager = self.module, self.module.forward
        compiled = torch.compile(eager, dynamic=self.dynamic)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.failed is None:
                try:
                    return compiled(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - decided below by whether eager fails as well
                    out = eager(*args, **kwargs)
                    first = str(error).strip().splitlines()
                    self.failed = f"{type(error).__name__}: {first[0][:300] if first else ''}"
                    log.warning("train.compile: torch.compile failed for %s (%s); training eager",
                                type(module).__name__, self.failed)
                    return out
            return eager(*args, **kwargs)

        self._previous = module.__dict__.get("forward")
        module.forward = forward  # type: ignore[method-assign]  # instance attribute: shadows the class's forward
        return self

    def __exit__(self, *exc: object) -> None:
        # copies made inside the context share the compiled closure (deepcopy keeps functions): make them outside
        if self._previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._previous  # type: ignore[method-assign]


def compile_target(model: nn.Module) -> nn.Module:
    """The submodule ``train.compile`` compiles: ``model.compile_target`` when the model names one (the denoiser's
    backbone: the loss around it holds host-side work such as the OT assignment), else the whole model."""
    target = getattr(model, "compile_target", None)
    return target if isinstance(target, nn.Module) else model


# --- logging / progress -------------------------------------------------------------------------------------------


def _truncate_log(path: Path, step: int) -> None:
    """Keep only well-formed records up to `step` (drops lines written after the checkpoint we resume from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept), durable=False)


class _RunLog:
    """JSONL log (always) and TensorBoard scalars (when the package is installed); main process only."""

    def __init__(self, out_dir: Path, start_step: int) -> None:
        self.path = out_dir / LOG_FILE
        _truncate_log(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb: Any = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed, so a kill loses at most the line being written)."""
        self.file.write(dumps_json(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close."""
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# --- trainer ------------------------------------------------------------------------------------------------------


class Trainer:
    """Trains `model` by minimizing `loss_fn(model, batch)` over `dataset`; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        dataset: Dataset,
        cfg: TrainConfig,
        out_dir: Path,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        run_config: dict[str, Any] | None = None,
        eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.loss_fn = loss_fn
        self.dataset = dataset
        # the content version of a prepared file data set (multidiff.datacache), recorded in the run log at every
        # start and resume, so a run continued on a changed data set says which version each stretch trained on
        self.data_version: str | None = getattr(dataset, "data_version", None)
        self.collate_fn = collate_fn
        # normalized through JSON so it compares equal to the copy read back from a checkpoint
        self.run_config: dict[str, Any] = json.loads(
            json.dumps(config_to_dict(run_config if run_config is not None else {"train": cfg}))
        )
        self.eval_fn = eval_fn
        self.progress = progress
        self.env = dist_env()
        self.device = resolve_device(device, self.env)
        self.model = model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.step = 0

    @property
    def ema_model(self) -> nn.Module:
        """The EMA copy of the model (what sampling should use)."""
        return self.ema.module

    # -- entry point --

    def fit(self, resume: bool | Path | str = False) -> TrainResult:
        """Train until `cfg.steps` or `cfg.max_minutes`; `resume=True` continues from the newest good checkpoint."""
        env, created = init_distributed(self.device)
        self.env = env
        lock = DirLock(self.out_dir, "multidiff train") if env.is_main else None  # taken in _choose_checkpoint
        try:
            return self._fit(resume, lock)
        finally:
            if lock is not None:
                lock.release()
            if created:
                destroy_distributed()

    def _fit(self, resume: bool | Path | str, lock: DirLock | None = None) -> TrainResult:
        cfg, env = self.cfg, self.env
        if cfg.batch_size % env.world_size:
            raise ValueError(
                f"train.batch_size={cfg.batch_size} (the global batch) must be divisible by the "
                f"number of processes ({env.world_size})"
            )
        chosen = resume_io.choose_checkpoint(self.out_dir, resume, env, lock)
        init_step: int | None = None
        start_step, elapsed_before, position = 0, 0.0, {"epoch": 0, "index": 0}
        if chosen is not None:
            point = self._load(chosen)
            start_step, elapsed_before, position = point.step, point.elapsed_s, point.data
        else:
            seed_everything(cfg.seed + env.rank)
            if cfg.init:
                init_step = self._warm_start(cfg.init)
        self.step = start_step

        net: nn.Module = self.model
        net = with_precision(net, cfg.precision, self.device)
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None)
        stream = _DataStream(self.dataset, cfg, env, self.collate_fn, self.device, **position)

        runlog: _RunLog | None = None
        if env.is_main:
            if chosen is not None and chosen.parent == ckpt_io.checkpoints_root(self.out_dir):
                for p in ckpt_io.set_aside_newer(self.out_dir, start_step):
                    log.warning("set aside %s (newer than the checkpoint resumed from)", p)
            ckpt_io._write_text_durable(self.out_dir / CONFIG_FILE, config_to_yaml(self.run_config))
            runlog = _RunLog(self.out_dir, start_step)
            runlog.write({"step": start_step, "event": "resume" if chosen else "start", "world_size": env.world_size,
                          **({"data_version": self.data_version} if self.data_version is not None else {}),
                          **({"checkpoint": str(chosen)} if chosen else {}),
                          **({"init": str(cfg.init), "init_step": init_step} if chosen is None and cfg.init else {})})
        show = self.progress and env.is_main and sys.stderr.isatty()
        bar = progress_bar("train", cfg.steps, enabled=show, completed=start_step,
                           extra=("loss {task.fields[loss]:.4g}", "{task.fields[sps]:.1f} steps/s"),
                           loss=float("nan"), sps=0.0)

        budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes is not None else math.inf
        t0 = time.perf_counter()

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - t0

        stopped: Literal["steps", "time", "interrupted"] = "time" if elapsed_before >= budget_s else "steps"
        last_loss: float | None = None
        last_ckpt: Path | None = chosen
        win_loss, win_n, win_t = 0.0, 0, time.perf_counter()
        self.model.train()
        stop, stop_signal = StopSignals(), None
        compiling = compiled_forward(compile_target(self.model)) if cfg.compile else None
        compile_noted = False
        try:
            with stop, compiling if compiling is not None else nullcontext():
                while self.step < cfg.steps and stopped == "steps":
                    loss, gnorm, lr, time_up, stop_signal = self._train_step(net, stream, elapsed() >= budget_s,
                                                                             stop.signum)
                    self.step += 1
                    last_loss = loss
                    if compiling is not None and compiling.failed and not compile_noted:
                        compile_noted = True
                        if runlog is not None:
                            runlog.write({"step": self.step, "event": "compile_failed", "error": compiling.failed})
                    win_loss, win_n = win_loss + loss, win_n + 1
                    if stop_signal:  # on any rank: every rank stops after the same step, with the same signal
                        stopped = "interrupted"
                    elif time_up:
                        stopped = "time"
                    final = self.step >= cfg.steps or stopped != "steps"
                    record: dict[str, Any] = {}
                    if self.step % cfg.log_every == 0 or final:
                        now = time.perf_counter()
                        sps = win_n / max(now - win_t, 1e-9)
                        record.update(
                            loss=win_loss / win_n, lr=lr, grad_norm=gnorm, steps_per_s=sps,
                            samples_per_s=sps * cfg.batch_size * cfg.grad_accum, epoch=stream.epoch,
                            wall_s=round(elapsed(), 3),
                        )
                        bar.update(completed=self.step, loss=win_loss / win_n, sps=sps)
                        win_loss, win_n, win_t = 0.0, 0, now
                    if (self.eval_fn is not None and cfg.eval_every > 0 and stopped != "interrupted"
                            and (self.step % cfg.eval_every == 0 or final)):  # interrupted: save first, no eval
                        if env.is_main:
                            record.update({f"eval/{k}": float(v) for k, v in self._evaluate().items()})
                    if record and runlog is not None:
                        runlog.write({"step": self.step, **record})
                    if (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0) or final:
                        last_ckpt = self._save(stream, elapsed())
                if stopped == "interrupted" and runlog is not None:
                    runlog.write({"step": self.step, "event": "interrupted", "signal": signal.Signals(stop_signal).name})
        except NonFiniteLossError as e:
            if runlog is not None:
                runlog.write({"step": self.step + 1, "event": "error", "error": str(e)})
            raise
        finally:
            bar.close()
            stream.close()
            if runlog is not None:
                runlog.close()
        return TrainResult(
            step=self.step,
            loss=last_loss,
            elapsed_s=elapsed(),
            stopped=stopped,
            checkpoint=last_ckpt if env.is_main else None,
            log_path=(self.out_dir / LOG_FILE) if env.is_main else None,
            signal=stop_signal if stopped == "interrupted" else None,
        )

    # -- one optimizer step --

    def _train_step(self, net: nn.Module, stream: _DataStream, time_up: bool,
                    signum: int | None = None) -> tuple[float, float, float, bool, int | None]:
        """Accumulate `grad_accum` micro-batches, check for NaN, clip, step; returns (loss, grad norm, lr, time_up,
        stop signal), time_up when on any rank, the stop signal SIGINT if any rank got it, else SIGTERM if any did."""
        cfg = self.cfg
        k = cfg.grad_accum
        ddp = self.env.enabled
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for j in range(k):
            batch = stream.next()
            with net.no_sync() if (ddp and j < k - 1) else nullcontext():  # type: ignore[operator]
                loss = self.loss_fn(net, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
                loss = loss.float().reshape(())
                (loss / k).backward()
            loss_sum += loss.detach()
        flags = [float(time_up), float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]
        stats = torch.cat([(loss_sum / k).reshape(1), torch.tensor(flags, device=self.device)])
        all_reduce_sum(stats)  # every rank sees the same mean loss, so all stop together on NaN
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_v, flag, sigint, sigterm, gnorm_v = torch.cat([stats, gnorm.reshape(1).to(stats)]).tolist()
        loss_v /= self.env.world_size
        if not math.isfinite(loss_v):
            raise NonFiniteLossError(
                f"loss is {loss_v} at step {self.step + 1} (data epoch {stream.epoch}); stopped before the update, "
                f"the last checkpoint is untouched"
            )
        if not math.isfinite(gnorm_v):
            raise NonFiniteLossError(
                f"gradient norm is {gnorm_v} at step {self.step + 1} (loss {loss_v:.6g}); stopped before the update"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        stop = signal.SIGINT if sigint > 0 else signal.SIGTERM if sigterm > 0 else None
        return loss_v, gnorm_v, lr, flag > 0, (int(stop) if stop is not None else None)

    # -- evaluation --

    def _evaluate(self) -> dict[str, float]:
        """Run eval_fn on the EMA model with forked RNGs, so evaluation never shifts the training random stream."""
        assert self.eval_fn is not None
        np_state, py_state = np.random.get_state(), random.getstate()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed + self.step)
            self.ema.module.eval()
            try:
                metrics = self.eval_fn(self.ema.module, self.step)
            finally:
                self.ema.module.train()
                np.random.set_state(np_state)
                random.setstate(py_state)
        return dict(metrics or {})

    # -- checkpoints (the bookkeeping is multidiff.resume's) --

    def _load(self, ckpt_dir: Path) -> resume_io.ResumePoint:
        """Restore weights, EMA, optimizer, schedule, RNG and data position from ``ckpt_dir``."""
        return resume_io.load_training_checkpoint(
            ckpt_dir, model=self.model, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler,
            run_config=self.run_config, env=self.env, device=self.device, seed=self.cfg.seed)

    def _warm_start(self, path: str) -> int | None:
        """Copy a finished run's EMA (else raw) weights into the model and its EMA before step 0 (fine-tuning / a
        warm restart of the schedule with fresh optimizer state); returns the step the weights were written at.
        Rank 0 resolves and checks the file and shares the result (or the error), so every rank loads the same
        checkpoint and all raise together."""
        decision: tuple[Path, int | None] | Exception | None = None
        checked: ckpt_io.LoadedCheckpoint | None = None
        if self.env.is_main:
            try:
                checked = self._check_init(path)
                decision = (checked.path, checked.step)
            except Exception as e:  # noqa: BLE001 - shared with the other ranks, raised below
                decision = e
        decision = broadcast_object(decision)
        if isinstance(decision, Exception):
            raise decision
        target, step = decision
        ckpt = checked if checked is not None else ckpt_io.load_checkpoint_for_sampling(target)  # rank 0 read it once
        self.model.load_state_dict(ckpt.weights(prefer_ema=True))
        self.ema.module.load_state_dict(self.model.state_dict())
        return step

    def _check_init(self, path: str) -> ckpt_io.LoadedCheckpoint:
        """The checkpoint that ``train.init`` names, checked against this run; errors name ``train.init``."""
        try:
            ckpt = ckpt_io.load_checkpoint_for_sampling(path)
        except ckpt_io.CheckpointError as e:
            raise ValueError(f"train.init={path}: {e}") from None
        mine, theirs = self.run_config.get("domain"), ckpt.config.get("domain")
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"train.init={path}: a checkpoint of domain {theirs!r}, this run trains {mine!r}")
        weights, own = ckpt.weights(prefer_ema=True), self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        shapes = [f"{k}: file {list(v.shape)}, model {list(own[k].shape)}" for k, v in weights.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(
                f"train.init={path}: its weights do not fit the model this config builds (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shapes {shapes[:3]}); give the init checkpoint's model settings "
                f"(e.g. --config RUN/config.yaml)")
        return ckpt

    def _save(self, stream: _DataStream, elapsed_s: float) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank contributes its RNG state)."""
        return resume_io.save_training_checkpoint(
            self.out_dir, self.step, model=self.model, ema=self.ema, optimizer=self.optimizer,
            scheduler=self.scheduler, data=stream.position(), elapsed_s=elapsed_s, run_config=self.run_config,
            env=self.env, device=self.device, keep=self.cfg.keep_checkpoints)
