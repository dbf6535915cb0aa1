"""Small file helpers shared by the CLI, the trainer and the domains: the one atomic write, a directory lock, strict
JSON, a write probe."""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no OS lock (the CLI targets Linux)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "DirLock", "DirLockedError", "atomic_write", "fsync_dir", "finite_json", "dumps_json", "write_json",
           "check_writable_dir"]

LOCK_FILE = ".multidiff.lock"


# --- atomic writes ---------------------------------------------------------------------------------------------------


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so that a rename in it survives a power cut (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, content: bytes | str | Callable[[Path], Any], *, durable: bool = True,
                 mode: int | None = None) -> Path:
    """Write a file so that a reader sees the old content or the new, never a part: the content goes to a fresh
    temporary file beside ``path`` (``.NAME.tmp-PID-N``), which is fsynced (``durable``) and renamed over
    ``path``; on any failure the temporary file is removed and the error re-raised (an ``OSError`` names ``path``).

    ``content`` is the bytes, the text (UTF-8), or a function that writes the temporary file at the path it is
    given (e.g. ``lambda tmp: safetensors.torch.save_file(tensors, tmp)``). The file gets the permissions of a
    plain ``open`` (0666 less the umask) unless ``mode`` is given."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    for k in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{k}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 leftovers of this very pid
        raise FileExistsError(f"{path}: cannot create a temporary file beside it")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            if durable:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


# --- strict JSON -----------------------------------------------------------------------------------------------------


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, recursively through dicts, lists, tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _json_default(fallback: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """A ``json.dumps`` default: numpy / torch scalars and arrays, numbers and paths; then ``fallback``."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):  # numpy arrays and scalars, torch tensors
            return finite_json(o.tolist())
        if isinstance(o, numbers.Integral):
            return int(o)
        if isinstance(o, numbers.Real):
            return finite_json(float(o))
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if fallback is not None:
            return finite_json(fallback(o))
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    return default


def dumps_json(obj: Any, *, fallback: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: NaN and ±inf become ``null`` (never the invalid ``NaN``/``Infinity``)."""
    return json.dumps(finite_json(obj), allow_nan=False, default=_json_default(fallback), **kwargs)


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as pretty, key-sorted strict JSON (see ``dumps_json``), atomically, and return the path."""
    return atomic_write(path, dumps_json(obj, indent=2, sort_keys=True) + "\n", durable=False)


# --- output directories ----------------------------------------------------------------------------------------------


def check_writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it (``os.access`` says yes
    to root even on read-only mounts); raises ``PermissionError`` naming the directory and the reason."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, FileExistsError) or (path.exists() and not path.is_dir()):
            reason = "it exists and is not a directory"
        elif e.errno == errno.ENOTDIR:
            reason = "a parent of it is a file, not a directory"
        raise PermissionError(f"{what} {path} is not writable: {reason}") from None
    return path


class DirLockedError(RuntimeError):
    """Another live process holds the lock of a directory; the message names its PID."""


class DirLock:
    """An exclusive OS lock (``fcntl.flock``) on ``DIR/.multidiff.lock`` holding the owner's PID and purpose.

    Taken without waiting: a second writer gets ``DirLockedError`` at once. The kernel drops the lock when the
    holder exits or is killed, so a crash never leaves a stale lock behind (the file may stay; it is reused).
    """

    def __init__(self, directory: Path, purpose: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        """Take the lock or raise ``DirLockedError`` naming the holder; creates the directory if needed."""
        if fcntl is None or self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise DirLockedError(
                    f"{self.directory} is in use by another multidiff process ({holder}); wait for it to finish "
                    f"or choose another directory"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder we waited on may have removed the file: then lock the new one instead
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()} {self.purpose} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """'PID n, purpose, since ...' from a held lock file (retrying briefly while the holder is still writing it)."""
    text = ""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text:
            break
        time.sleep(0.05)
    if not text.startswith("pid="):
        return "PID unknown"
    pid, _, rest = text[4:].partition(" ")
    return f"PID {pid}, {rest}" if rest else f"PID {pid}"
