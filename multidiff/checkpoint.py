"""Checkpoints: safetensors weights (+EMA, +run config in the metadata), a weights-only `state.pt`, atomic directories.

Layout of a run directory::

    out_dir/checkpoints/step_00000100/
        model.safetensors   tensors `model.<name>` and `ema.<name>`; metadata: run config (JSON), step, ...
        state.pt            optimizer, LR scheduler, step, RNG states, data position (torch.save, weights_only-loadable)
        MANIFEST.json       byte size and sha256 of the two files above; written last

A checkpoint is written into `checkpoints/.tmp-...`, fsynced, then renamed into place, so a `step_*` directory is
always complete; the manifest additionally catches later damage (truncation, bit rot). "Latest" is the highest
step whose manifest verifies; there is no pointer file to go stale.
Running out of space half-way removes the partial directory and raises one CheckpointError; earlier ones stay.

An exported single file (`export_weights`) carries `content_sha256` in its metadata (its tensors and other metadata),
checked by every load; files without it (older exports) load unchecked.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from multidiff.files import atomic_write

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "LoadedCheckpoint",
    "WEIGHTS_FILE",
    "STATE_FILE",
    "MANIFEST_FILE",
    "save_weights",
    "load_weights",
    "export_weights",
    "content_sha256",
    "save_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_latest_checkpoint",
    "load_training_state",
    "load_checkpoint_for_sampling",
    "prune_checkpoints",
    "checkpoints_root",
]

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "MANIFEST.json"
CHECKPOINTS_DIR = "checkpoints"
FORMAT = "multidiff-checkpoint"
FORMAT_VERSION = 1
CONTENT_HASH_KEY = "content_sha256"  # exported files: sha256 of their tensors and other metadata, verified on load
_OUT_OF_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


# --- low-level file helpers ------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry table (makes renames/creations durable)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync `data` to `path`; an OSError carries the file name (e.g. ENOSPC half-way through)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _write_text_durable(path: Path, text: str) -> None:
    """Write text to `path` atomically and durably (``files.atomic_write``)."""
    atomic_write(path, lambda tmp: _write_bytes(tmp, text.encode("utf-8")))


def _remove_tree(path: Path) -> None:
    """Delete a directory so it vanishes at once: rename to a hidden trash name, then rmtree."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


# --- weights -------------------------------------------------------------------------------------------------------


def _as_state(obj: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A module's state_dict (unwrapping DDP / AveragedModel / compile wrappers) or a given mapping."""
    if isinstance(obj, nn.Module):
        from torch.nn.parallel import DistributedDataParallel
        from torch.optim.swa_utils import AveragedModel

        while isinstance(obj, (DistributedDataParallel, AveragedModel)):
            obj = obj.module
        obj = getattr(obj, "_orig_mod", obj)  # torch.compile
        return obj.state_dict()
    return obj


def _tensors_for_saving(prefix: str, state: Mapping[str, Any], out: dict[str, Tensor], seen: set[int]) -> None:
    """Copy a state dict into `out` under `prefix`, on CPU, contiguous, with no two entries sharing memory."""
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"cannot store {prefix}{name} ({type(value).__name__}) in safetensors: only tensors are allowed"
            )
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[prefix + name] = t


def content_sha256(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """Hex sha256 of a safetensors file's content: every tensor (name, dtype, shape, bytes) and every metadata entry
    except the hash itself, in sorted order (independent of the header's layout)."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != CONTENT_HASH_KEY:
            h.update(json.dumps(["meta", key, metadata[key]]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps(["tensor", name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_weights(
    path: Path | str,
    model: nn.Module | Mapping[str, Tensor],
    ema: nn.Module | Mapping[str, Tensor] | None = None,
    config: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    content_hash: bool = False,
) -> None:
    """Write model (`model.*`) and EMA (`ema.*`) tensors to one safetensors file; config and meta go in the header
    (with `content_hash`, also a sha256 of the content that `load_weights` verifies)."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    _tensors_for_saving("model.", _as_state(model), tensors, seen)
    if ema is not None:
        _tensors_for_saving("ema.", _as_state(ema), tensors, seen)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(dict(config) if config is not None else {}, sort_keys=False),
        "has_ema": "1" if ema is not None else "0",
    }
    for key, value in (extra_meta or {}).items():
        if key in metadata or key == CONTENT_HASH_KEY:
            raise ValueError(f"extra_meta key {key!r} is reserved")
        metadata[key] = json.dumps(value)
    if content_hash:
        metadata[CONTENT_HASH_KEY] = content_sha256(tensors, metadata)
    # serialised in memory, so that running out of space surfaces as a plain OSError (ENOSPC) of this file
    atomic_write(path, lambda tmp: _write_bytes(tmp, safetensors_bytes(tensors, metadata=metadata)))


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the raw metadata of a safetensors file; damage raises CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    expected = meta.get(CONTENT_HASH_KEY)
    if expected is not None:
        actual = content_sha256(tensors, meta)
        if actual != expected:
            raise CheckpointError(
                f"{path}: corrupted: the sha256 of its content is {actual[:16]}..., the one recorded when it was "
                f"written is {expected[:16]}... (re-download or re-export the file)"
            )
    return tensors, meta


def load_weights(
    path: Path | str,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, Any], dict[str, Any]]:
    """Read a weights file: (model state, EMA state or None, run config, other metadata). No pickle involved."""
    path = Path(path)
    tensors, raw_meta = _read_safetensors(path)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    ema_state = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    if raw_meta.get("format") != FORMAT:  # a plain safetensors state dict from elsewhere
        return dict(tensors), None, {}, dict(raw_meta)
    try:
        config = json.loads(raw_meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the run config in the metadata is not valid JSON ({e})") from e
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        if key in ("config", "format", "format_version", "has_ema"):
            continue
        if key == CONTENT_HASH_KEY:
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    meta["format_version"] = int(raw_meta.get("format_version", "1"))
    return model_state, (ema_state if raw_meta.get("has_ema") == "1" else None), config, meta


# --- checkpoint directories ----------------------------------------------------------------------------------------


def checkpoints_root(path: Path | str) -> Path:
    """The directory holding `step_*` checkpoints, given a run dir or that directory itself."""
    path = Path(path)
    if path.name == CHECKPOINTS_DIR or (path.is_dir() and not (path / CHECKPOINTS_DIR).exists() and _has_steps(path)):
        return path
    return path / CHECKPOINTS_DIR


def _has_steps(path: Path) -> bool:
    """True when a directory directly holds `step_*` checkpoint directories."""
    return any(_STEP_RE.match(p.name) for p in path.iterdir() if p.is_dir())


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint for `step` (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


def list_checkpoints(path: Path | str) -> list[tuple[int, Path]]:
    """(step, dir) of every `step_*` directory under a run dir, ascending; no verification."""
    root = checkpoints_root(path)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    out_dir: Path | str,
    step: int,
    model: nn.Module | Mapping[str, Tensor],
    ema: nn.Module | Mapping[str, Tensor] | None,
    state: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """Atomically write `checkpoints/step_<step>/` (weights, state, manifest); keep the newest `keep` (0: all)."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = {"step": step, **(extra_meta or {})}
        save_weights(tmp / WEIGHTS_FILE, model, ema, config, meta)
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        _write_bytes(tmp / STATE_FILE, buffer.getbuffer())
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in (WEIGHTS_FILE, STATE_FILE)
        }
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "files": files}
        _write_text_durable(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written checkpoint; the earlier ones are untouched
        if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE:
            previous = list_checkpoints(root)
            kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(
                f"no space left on the device while writing {e.filename or tmp} (checkpoint of step {step}); "
                f"nothing was written, {kept}; free some space and continue with --resume"
            ) from None
        raise
    if final.exists():  # re-reaching a step after resuming from an older checkpoint
        old = root / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        prune_checkpoints(root, keep)
    return final


def prune_checkpoints(path: Path | str, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoints; return the deleted directories."""
    ckpts = list_checkpoints(path)
    doomed = [p for _, p in ckpts[:-keep]] if keep > 0 else []
    for p in doomed:
        _remove_tree(p)
    return doomed


def remove_stale_temporaries(path: Path | str) -> None:
    """Delete leftovers of interrupted writes/deletes (`.tmp-*`, `.trash-*`) under a run's checkpoints dir."""
    root = checkpoints_root(path)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def set_aside_newer(path: Path | str, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` to `step_*.stale` so a resumed run never mixes them with its own."""
    moved = []
    for s, p in list_checkpoints(path):
        if s > step:
            target = p.with_name(p.name + ".stale")
            n = 1
            while target.exists():
                target = p.with_name(f"{p.name}.stale{n}")
                n += 1
            os.rename(p, target)
            moved.append(target)
    return moved


def verify_checkpoint(ckpt_dir: Path | str) -> dict[str, Any]:
    """Check a checkpoint dir against its manifest (presence, size, sha256) and the safetensors header."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    mpath = ckpt_dir / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing, so the checkpoint is incomplete")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e
    for name, info in files.items():
        f = ckpt_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST_FILE})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {info['bytes']} (truncated or overwritten)")
        digest = _sha256(f)
        if digest != info["sha256"]:
            raise CheckpointError(
                f"{f}: sha256 {digest[:12]}... does not match the manifest ({info['sha256'][:12]}...)"
            )
    weights = ckpt_dir / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as st:
            st.metadata()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors header ({e})") from e
    return manifest


def find_latest_checkpoint(path: Path | str, *, warn: bool = True) -> Path | None:
    """The newest checkpoint dir that verifies, skipping (and warning about) damaged ones; None if there are none."""
    ckpts = list_checkpoints(path)
    problems = []
    for _step, ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            if warn:
                warnings.warn(f"skipping damaged checkpoint: {e}; trying an older one", CheckpointWarning, stacklevel=2)
            continue
        return ckpt
    if problems:
        raise CheckpointError(
            f"no usable checkpoint under {checkpoints_root(path)}: all {len(problems)} are damaged:\n  "
            + "\n  ".join(problems)
        )
    return None


def load_training_state(ckpt_dir: Path | str) -> dict[str, Any]:
    """The resumable state of a checkpoint dir (`state.pt`), loaded with `weights_only=True`."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointNotFoundError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged pickles/zips
        raise CheckpointError(f"{path}: cannot load the training state ({type(e).__name__}: {e})") from e


@dataclass
class LoadedCheckpoint:
    """Weights, EMA weights, run config and metadata of one checkpoint."""

    path: Path
    model_state: dict[str, Tensor]
    ema_state: dict[str, Tensor] | None
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        """Training step at which the checkpoint was written (None if unknown)."""
        step = self.meta.get("step")
        return int(step) if step is not None else None

    def weights(self, prefer_ema: bool = True) -> dict[str, Tensor]:
        """EMA weights when present and preferred, else the raw model weights."""
        return self.ema_state if (prefer_ema and self.ema_state is not None) else self.model_state


def resolve_checkpoint(path: Path | str) -> Path:
    """A run dir, checkpoints dir, checkpoint dir or .safetensors file -> the checkpoint dir or file to read."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(
            f"checkpoint not found: {p} (give a run directory, a checkpoint directory or a .safetensors file)"
        )
    if p.is_file():
        return p
    if (p / WEIGHTS_FILE).is_file() or (p / MANIFEST_FILE).is_file():
        return p
    latest = find_latest_checkpoint(p)
    if latest is None:
        raise CheckpointNotFoundError(
            f"no checkpoint in {p}: expected {checkpoints_root(p)}/step_*/{WEIGHTS_FILE}, "
            f"a checkpoint directory or a .safetensors file"
        )
    return latest


def load_checkpoint_for_sampling(path: Path | str) -> LoadedCheckpoint:
    """Load weights + config for inference from a run dir, a checkpoint dir or a .safetensors file (no pickle)."""
    target = resolve_checkpoint(path)
    if target.is_dir():
        verify_checkpoint(target)
        weights = target / WEIGHTS_FILE
    else:
        weights = target
        if (target.parent / MANIFEST_FILE).is_file() and target.name == WEIGHTS_FILE:
            verify_checkpoint(target.parent)
    model_state, ema_state, config, meta = load_weights(weights)
    return LoadedCheckpoint(weights, model_state, ema_state, config, meta)


STORAGE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast_for_storage(weights: Mapping[str, Tensor], dtype: torch.dtype, where: Path) -> dict[str, Tensor]:
    """Floating-point tensors cast to the storage dtype (loading casts back: ``load_state_dict`` copies into the
    fp32 parameters); integer buffers stay; a value outside the dtype's finite range is refused, naming the tensor."""
    limit = torch.finfo(dtype).max
    out: dict[str, Tensor] = {}
    for name, t in weights.items():
        if t.is_floating_point() and t.dtype != dtype:
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > limit:
                raise ValueError(f"{where}: cannot store {name} as {dtype}: |value| {peak:.4g} exceeds its range "
                                 f"({limit:.4g}); export it as fp32")
            t = t.to(dtype)
        out[name] = t
    return out


def export_weights(src: Path | str | LoadedCheckpoint, out: Path | str, config: Mapping[str, Any] | None = None,
                   prefer_ema: bool = True, dtype: str = "fp32") -> Path:
    """One self-contained inference file from a run / checkpoint (or one already loaded): the EMA (else raw) weights
    as ``model.*`` plus the run config (``config`` replaces it, e.g. with changed sample defaults) and the step;
    ``dtype`` fp16 / bf16 stores the fp32 tensors at half the size (IEEE half keeps 11 significant bits, bf16 8)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype: expected one of fp32, fp16, bf16, got {dtype!r}")
    ckpt = src if isinstance(src, LoadedCheckpoint) else load_checkpoint_for_sampling(src)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the exported file must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    used_ema = prefer_ema and ckpt.ema_state is not None
    meta = {"step": ckpt.step, "exported_from": str(ckpt.path), "weights": "ema" if used_ema else "model"}
    if dtype != "fp32":
        meta["storage_dtype"] = dtype
    config = dict(config) if config is not None else ckpt.config
    weights = _cast_for_storage(ckpt.weights(prefer_ema), STORAGE_DTYPES[dtype], out)
    try:
        save_weights(out, weights, None, config, meta, content_hash=True)
    except OSError as e:
        if e.errno in _OUT_OF_SPACE:
            raise CheckpointError(f"no space left on the device while writing {out}; nothing was written") from None
        raise
    return out
