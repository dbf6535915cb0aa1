"""Change data capture for file-based data sets: a prepared-data cache with a content index.

The cache of one data folder (one processing setting) holds ``index.json`` — per file its relative path, size,
mtime (ns), sha256 and what processing it produced (a skip reason, notes, the rows of its tensors) — and one
``data-VERSION.safetensors`` with every file's processed tensors concatenated. ``ContentIndexCache.sync`` compares
the folder with the index the way make / rsync do: a file whose size and mtime are unchanged is trusted; one whose
stat changed is hashed, and only if its sha256 differs is it reprocessed. Added files are processed, removed ones
dropped, unchanged rows are copied from the previous data file, and the result is written to a new data file,
then the index is atomically replaced (a crash leaves the previous version intact). Each file is processed alone,
so an incrementally updated cache equals a full rebuild bit for bit. The data version is a sha256 over the
processing settings and every (path, sha256): the same content gives the same version wherever it is prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .files import atomic_write

__all__ = ["CACHE_FORMAT", "ContentIndexCache", "FileResult", "SyncResult", "cache_root", "watch"]

CACHE_FORMAT = "multidiff-content-index-v1"
INDEX_FILE = "index.json"


def cache_root() -> Path:
    """``$MULTIDIFF_CACHE``, else ``~/.cache/multidiff``."""
    env = os.environ.get("MULTIDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "multidiff"


@dataclass
class FileResult:
    """What processing one file gave: tensors (None when the file is skipped) and JSON metadata (reasons, notes)."""

    tensors: dict[str, Tensor] | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyncResult:
    """The folder's state after a sync: per file its metadata, what changed, and the data version."""

    cache: ContentIndexCache
    entries: dict[str, dict[str, Any]]
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    hashed: int
    version: str
    seconds: float

    @property
    def changes(self) -> dict[str, Any]:
        """A JSON summary of the changes (counts, and up to 10 names of each kind)."""
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
                "unchanged": self.unchanged, "hashed": self.hashed, "data_version": self.version,
                **{f"{k}_files": v[:10] for k, v in (("added", self.added), ("changed", self.changed),
                                                     ("removed", self.removed)) if v}}

    def tensors(self, rel: str) -> dict[str, Tensor] | None:
        """The processed tensors of file ``rel`` (None for a skipped file)."""
        return self.cache.tensors(self.entries[rel])

    def stack(self, name: str, rels: list[str]) -> Tensor:
        """Tensor ``name`` of the files ``rels`` (none skipped) concatenated in that order, read in one pass."""
        return self.cache.stack(name, [self.entries[r] for r in rels])


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ContentIndexCache:
    """A prepared-data cache of one folder and one processing setting (see the module docstring)."""

    def __init__(self, directory: Path, settings: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.settings = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
        self._data_path: Path | None = None
        self._handle: Any = None

    @classmethod
    def for_folder(cls, kind: str, root: Path, settings: Mapping[str, Any]) -> ContentIndexCache:
        """The cache of ``root`` under ``cache_root()/kind/`` named by a hash of the folder and settings."""
        full = {"root": str(Path(root).expanduser().resolve()), **settings}
        key = _sha256_bytes(json.dumps(full, sort_keys=True, default=str).encode())[:16]
        return cls(cache_root() / kind / key, full)

    # --- index ----------------------------------------------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        path = self.directory / INDEX_FILE
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        if index.get("format") != CACHE_FORMAT or index.get("settings") != self.settings:
            return {}
        if index.get("data") and not (self.directory / index["data"]).is_file():
            return {}  # the data file is gone: rebuild
        return index

    def version_of(self, entries: Mapping[str, Mapping[str, Any]]) -> str:
        """sha256 over the settings and every (relative path, content sha256), sorted by path."""
        h = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode())
        for rel in sorted(entries):
            h.update(f"\0{rel}\0{entries[rel]['sha256']}".encode())
        return h.hexdigest()[:16]

    # --- sync -----------------------------------------------------------------------------------------------------
    def sync(self, files: Mapping[str, Path], process: Callable[[str, bytes], FileResult], *,
             rebuild: bool = False) -> SyncResult:
        """Bring the cache in line with ``files`` (relative name -> path): process only added / changed files."""
        start = time.perf_counter()
        old = {} if rebuild else self._read_index()
        old_entries: dict[str, dict[str, Any]] = old.get("files", {})
        entries: dict[str, dict[str, Any]] = {}
        fresh: dict[str, dict[str, Tensor]] = {}
        added, changed = [], []
        unchanged = hashed = 0
        restat = False
        for rel in sorted(files):
            path = files[rel]
            st = os.stat(path)
            prev = old_entries.get(rel)
            if prev is not None and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
                entries[rel] = prev
                unchanged += 1
                continue
            data = path.read_bytes()
            digest = _sha256_bytes(data)
            hashed += 1
            if prev is not None and prev["sha256"] == digest:  # touched, same content: keep, remember the new stat
                entries[rel] = {**prev, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                unchanged += 1
                restat = True
                continue
            result = process(rel, data)
            entries[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest, "meta": result.meta}
            if result.tensors is not None:
                fresh[rel] = result.tensors
            (changed if prev is not None else added).append(rel)
        removed = sorted(set(old_entries) - set(entries))
        version = self.version_of(entries)
        if added or changed or removed or not old:
            self._write(entries, fresh, old, version)
        else:
            if restat:  # only stats changed (files touched or re-created with the same bytes): same data file
                self._write_index({**old, "files": entries})
            self._data_path = self.directory / old["data"] if old.get("data") else None
        return SyncResult(self, entries, added, changed, removed, unchanged, hashed, version,
                          time.perf_counter() - start)

    def _open(self, data: Path | None) -> Any:
        from safetensors import safe_open

        if data is None:
            return None
        if self._handle is None or self._data_path != data:
            self._handle, self._data_path = safe_open(str(data), framework="pt"), data
        return self._handle

    def tensors(self, entry: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """The tensors of one index entry, read from the current data file (None for a skipped file)."""
        rows = entry.get("rows")
        if rows is None:
            return None
        f = self._open(self._data_path)
        return {name: f.get_slice(name)[a:b] for name, (a, b) in rows.items()}

    def stack(self, name: str, entries: list[Mapping[str, Any]]) -> Tensor:
        """Rows of tensor ``name`` for several entries, concatenated: one read of the tensor, one gather."""
        f = self._open(self._data_path)
        spans = [entry["rows"][name] for entry in entries]
        if f is None or not spans:
            raise ValueError(f"{self.directory}: no cached tensor {name!r} for these files")
        full = f.get_tensor(name)
        index = torch.cat([torch.arange(a, b) for a, b in spans])
        return full.index_select(0, index)

    def _write(self, entries: dict[str, dict[str, Any]], fresh: dict[str, dict[str, Tensor]], old: dict[str, Any],
               version: str) -> None:
        """Write the new data file (kept rows copied from the old one), then replace the index; drop the old file."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        previous = self.directory / old["data"] if old.get("data") else None
        parts: dict[str, list[Tensor]] = {}
        offsets: dict[str, int] = {}
        for rel in sorted(entries):
            entry = entries[rel]
            tensors = fresh[rel] if rel in fresh else (self._old_tensors(previous, entry) if rel not in fresh else None)
            if tensors is None:
                entry.pop("rows", None)
                continue
            rows = {}
            for name, t in tensors.items():
                a = offsets.get(name, 0)
                rows[name] = [a, a + int(t.shape[0])]
                offsets[name] = a + int(t.shape[0])
                parts.setdefault(name, []).append(t.contiguous())
            entry["rows"] = rows
        name = f"data-{version}-{os.getpid()}-{time.time_ns()}.safetensors"
        data_file = self.directory / name
        atomic_write(data_file, lambda tmp: save_file({k: torch.cat(v) for k, v in parts.items()}, tmp))
        self._handle = None
        self._write_index({"format": CACHE_FORMAT, "settings": self.settings, "data": name, "version": version,
                           "files": entries})
        self._data_path = data_file
        for stale in self.directory.glob("data-*.safetensors"):
            if stale != data_file:
                stale.unlink(missing_ok=True)

    def _old_tensors(self, previous: Path | None, entry: Mapping[str, Any]) -> dict[str, Tensor] | None:
        if previous is None or entry.get("rows") is None:
            return None
        f = self._open(previous)
        return {name: f.get_slice(name)[a:b] for name, (a, b) in entry["rows"].items()}

    def _write_index(self, index: dict[str, Any]) -> None:
        atomic_write(self.directory / INDEX_FILE, json.dumps(index, sort_keys=True))


def watch(sync: Callable[[], dict[str, Any]], *, interval: float = 2.0, max_seconds: float | None = None,
          on_change: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Poll: every ``interval`` seconds (until ``max_seconds``) call ``sync()`` and report the syncs that changed
    something (their summary's ``changes`` has added / changed / removed files); returns how many did.

    Polling (a stat of every file, hashing only those whose stat changed) works on every filesystem, network mounts
    included, where inotify-style events do not, at the cost of up to ``interval`` seconds of delay.
    """
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    found = 0
    while deadline is None or time.monotonic() + interval <= deadline:
        time.sleep(interval)
        summary = sync()
        changes = summary.get("changes", {})
        if any(changes.get(k) for k in ("added", "changed", "removed")):
            found += 1
            if on_change is not None:
                on_change(summary)
    return found
