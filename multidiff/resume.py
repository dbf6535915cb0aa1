"""Resume bookkeeping of a training run: RNG capture / restore, which checkpoint to resume from, and loading /
saving everything a bit-identical continuation needs. ``Trainer`` (``multidiff.training``) keeps the loop and calls
these; the on-disk layout and its atomic writes are ``multidiff.checkpoint``'s.

What a checkpoint's ``state.pt`` holds (``STATE_VERSION`` 1, loadable with ``torch.load(weights_only=True)``): the
step, optimizer and LR-scheduler state, the EMA's number of averaged models, the data position (epoch, batch within
it), the RNG states of every process (torch, numpy, ``random``, CUDA), the world size and the training seconds so
far. The weights (model + EMA) and the run config are in ``model.safetensors`` beside it.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from multidiff import checkpoint as ckpt_io
from multidiff.distributed import DistEnv, all_gather_object, broadcast_object
from multidiff.files import DirLock

__all__ = [
    "STATE_VERSION",
    "ResumePoint",
    "seed_everything",
    "capture_rng",
    "restore_rng",
    "find_resume_checkpoint",
    "choose_checkpoint",
    "load_training_checkpoint",
    "save_training_checkpoint",
    "changed_keys",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- RNG state as weights_only-loadable data -------------------------------------------------------------------------


def capture_rng(device: torch.device) -> dict[str, Any]:
    """All global RNG states as tensors/lists/ints (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- which checkpoint -------------------------------------------------------------------------------------------------


def find_resume_checkpoint(out_dir: Path, resume: bool | Path | str | None) -> Path | None:
    """``resume`` -> a verified checkpoint dir, or None to start fresh.

    False / None: start fresh, refusing a directory that already holds checkpoints. True: the newest good
    checkpoint of ``out_dir`` (None when there is none). A path: a run / checkpoints / checkpoint directory,
    found by ``checkpoint.resolve_checkpoint``; an explicitly named checkpoint directory must verify (no silent
    fallback to an older one), and a weights file is refused (it has no training state)."""
    if resume is False or resume is None:
        existing = ckpt_io.list_checkpoints(out_dir)
        if existing:
            raise FileExistsError(
                f"{out_dir} already holds checkpoints (latest {existing[-1][1].name}); "
                f"resume it (--resume / fit(resume=True)) or choose another output directory"
            )
        return None
    if resume is True:
        found = ckpt_io.find_latest_checkpoint(out_dir)
        if found is None:
            log.info("no checkpoint in %s; starting from scratch", out_dir)
        return found
    path = Path(resume)
    if path.is_file():
        raise ckpt_io.CheckpointError(
            f"{path}: resuming needs a checkpoint directory (with {ckpt_io.STATE_FILE}), not a weights file"
        )
    target = ckpt_io.resolve_checkpoint(path)  # missing path / nothing under it: CheckpointNotFoundError
    if target == path:
        ckpt_io.verify_checkpoint(path)  # an explicitly named checkpoint must be intact
    return target


def choose_checkpoint(out_dir: Path, resume: bool | Path | str | None, env: DistEnv,
                      lock: DirLock | None = None) -> Path | None:
    """On rank 0 lock the run directory (a second writer stops here), clear what a crash left and pick the
    checkpoint to resume from; share the decision (or the error) with all ranks."""
    decision: Path | Exception | None = None
    if env.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if lock is not None:
                lock.acquire()
            ckpt_io.remove_stale_temporaries(out_dir)
            decision = find_resume_checkpoint(out_dir, resume)
        except Exception as e:  # broadcast so that every rank raises, instead of the others hanging
            decision = e
    decision = broadcast_object(decision)
    if isinstance(decision, Exception):
        raise decision
    return decision


# --- load / save ------------------------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """Where a loaded checkpoint leaves the run: its step, training seconds so far and data position."""

    step: int
    elapsed_s: float
    data: dict[str, int]


def load_training_checkpoint(ckpt_dir: Path, *, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer,
                             scheduler: Any, run_config: dict[str, Any], env: DistEnv, device: torch.device,
                             seed: int) -> ResumePoint:
    """Restore weights, EMA, optimizer, schedule and this rank's RNG state from ``ckpt_dir``; refuses weights of
    another shape (naming the changed config keys) before anything is loaded. A checkpoint written by another
    number of processes re-seeds the random streams (with a warning: the run will not be bit-identical)."""
    model_state, ema_state, saved_config, _meta = ckpt_io.load_weights(ckpt_dir / ckpt_io.WEIGHTS_FILE)
    state = ckpt_io.load_training_state(ckpt_dir)
    changed = changed_keys(saved_config, run_config)
    check_shapes(ckpt_dir, model_state, model, changed)
    model.load_state_dict(model_state)
    ema.module.load_state_dict(ema_state if ema_state is not None else model_state)
    ema.n_averaged.fill_(int(state["ema_n_averaged"]))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        restore_rng(rngs[env.rank], device)
    else:
        if env.is_main:
            warnings.warn(
                f"{ckpt_dir} was written by {len(rngs)} process(es), this run has {env.world_size}: "
                f"random streams are re-seeded, so the run will not match an uninterrupted one bit for bit",
                stacklevel=4,
            )
        seed_everything(seed + env.rank + 1_000_003 * int(state["step"]))
    if env.is_main and saved_config != run_config:
        log.warning("resuming %s with a changed config: %s", ckpt_dir, ", ".join(changed) or "(structure)")
    log.info("resumed from %s (step %d)", ckpt_dir, state["step"])
    return ResumePoint(int(state["step"]), float(state["elapsed_s"]), dict(state["data"]))


def save_training_checkpoint(out_dir: Path, step: int, *, model: nn.Module, ema: Any,
                             optimizer: torch.optim.Optimizer, scheduler: Any, data: dict[str, int],
                             elapsed_s: float, run_config: dict[str, Any], env: DistEnv, device: torch.device,
                             keep: int) -> Path | None:
    """Write the checkpoint of ``step`` (every rank contributes its RNG state; rank 0 writes and returns the
    directory, the others None), keeping the newest ``keep``."""
    rngs = all_gather_object(capture_rng(device))
    if not env.is_main:
        return None
    state = {
        "version": STATE_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema_n_averaged": int(ema.n_averaged.item()),
        "data": data,
        "rng": rngs,
        "world_size": env.world_size,
        "elapsed_s": elapsed_s,
    }
    return ckpt_io.save_checkpoint(out_dir, step, model, ema.module, state, config=run_config,
                                   extra_meta={"torch_version": torch.__version__}, keep=keep)


def check_shapes(ckpt_dir: Path, saved: Mapping[str, Tensor], model: nn.Module, changed: list[str]) -> None:
    """Refuse to resume weights whose shapes the current config (or data) no longer matches, naming what differs."""
    own = model.state_dict()
    diffs = [f"{k}: saved {list(v.shape)}, now {list(own[k].shape)}" for k, v in saved.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if diffs:
        raise ValueError(
            f"cannot resume {ckpt_dir}: the model built from the current config and data has other shapes "
            f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}); config keys that changed: "
            f"{', '.join(changed) or 'none'}. A data set with a new label or a changed model size needs a new run "
            f"(--out elsewhere), not --resume"
        )


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
