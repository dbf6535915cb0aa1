"""Resumable batch jobs: ``multidiff sample DOMAIN --jobs jobs.jsonl --out DIR``.

One request per line of a JSONL file. Each job is generated with the one generate path (``pipeline.sample_to_dir``)
into a hidden ``DIR/.partial-ID/``, its files are hashed and fsync'ed, the directory is renamed to ``DIR/ID/`` (an
atomic rename), and only then is one line appended to ``DIR/manifest.jsonl`` (job id, parameters, seed, files with
sha256, metrics). The manifest line is the commit point (as in a write-ahead log): a job without one is not done,
and a re-run removes whatever it left (a ``.partial-*`` directory, or a renamed directory whose line never made it)
and runs it again, so after any number of crashes every job is in the manifest exactly once. Under torchrun the
pending jobs are sharded over ranks (rank r takes every world-th one); each rank appends to its own
``.manifest-rankR.jsonl`` and rank 0 merges them into ``manifest.jsonl`` (write-then-rename) at the end or on the
next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .files import atomic_write, dumps_json

__all__ = ["Job", "JOB_FIELDS", "MANIFEST", "read_jobs", "read_manifest", "run_jobs", "verify_manifest", "JobsError"]

MANIFEST = "manifest.jsonl"
PARTIAL_PREFIX = ".partial-"
SHARD_GLOB = ".manifest-rank*.jsonl"
JOB_FIELDS = ("id", "num", "seed", "label", "conditions", "steps", "sampler", "grid", "guidance", "gradient_scale",
              "rtol", "atol", "inpaint", "mask")
SEED_STRIDE = 1 << 20  # job k without its own seed gets --seed + k * SEED_STRIDE (its samples seed + i never overlap)
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class JobsError(ValueError):
    """A bad jobs file or manifest; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Job:
    """One request of a jobs file: what to sample and into which sub-directory (``id``)."""

    id: str
    line: int
    num: int | None = None
    seed: int = 0
    conditions: dict[str, str] = field(default_factory=dict)
    steps: int | None = None
    sampler: str | None = None
    grid: str | None = None
    guidance: float | None = None
    gradient_scale: float = 0.0
    rtol: float | None = None  # sampler 'adaptive' only
    atol: float | None = None
    inpaint: str | None = None
    mask: str | None = None


def _typed(where: str, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is of ``kind`` (bool is never a number), else a JobsError naming the field."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise JobsError(f"{where}: field {key!r}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise JobsError(f"{where}: field {key!r}: expected {what}, got {value!r}")
    return value


def read_jobs(path: Path, *, seed: int = 0) -> list[Job]:
    """Parse a jobs JSONL file (blank lines and ``#`` comments skipped); errors name the file, line and field.

    Fields: ``id`` (default ``job-LINE``), ``num``, ``seed`` (default ``seed + k * 2**20`` for the k-th job),
    ``label``, ``conditions`` (an object of KEY: VALUE), ``steps``, ``sampler``, ``grid``, ``guidance``,
    ``gradient_scale``, ``rtol`` / ``atol`` (sampler 'adaptive' only), ``inpaint`` (a path, relative to the jobs
    file) and ``mask``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--jobs {path}: no such file") from None
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobsError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise JobsError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(JOB_FIELDS))
        if unknown:
            raise JobsError(f"{where}: unknown field(s) {unknown}; allowed: {list(JOB_FIELDS)}")
        job_id = str(obj.get("id", f"job-{lineno:06d}"))
        if not _ID.match(job_id):
            raise JobsError(f"{where}: field 'id': {job_id!r} is not a plain directory name "
                            f"(letters, digits, '.', '_', '-'; not starting with '.' or '-')")
        if job_id in seen:
            raise JobsError(f"{where}: field 'id': {job_id!r} is already used on line {seen[job_id]}")
        seen[job_id] = lineno
        conditions: dict[str, str] = {}
        cond = obj.get("conditions", {})
        if not isinstance(cond, dict):
            raise JobsError(f"{where}: field 'conditions': expected an object like {{\"label\": 3}}, got {cond!r}")
        for key, value in cond.items():
            conditions[str(key)] = str(value)
        if "label" in obj:
            if "label" in conditions:
                raise JobsError(f"{where}: field 'label': given twice (also in 'conditions')")
            conditions["label"] = str(obj["label"])
        num = obj.get("num")
        if num is not None and (_typed(where, "num", num, int, "an integer >= 1") < 1):
            raise JobsError(f"{where}: field 'num': expected an integer >= 1, got {num}")
        job_seed = obj.get("seed", seed + len(jobs) * SEED_STRIDE)
        _typed(where, "seed", job_seed, int, "an integer")
        steps = obj.get("steps")
        if steps is not None and _typed(where, "steps", steps, int, "an integer >= 1") < 1:
            raise JobsError(f"{where}: field 'steps': expected an integer >= 1, got {steps}")
        for key in ("sampler", "grid", "inpaint", "mask"):
            if obj.get(key) is not None:
                _typed(where, key, obj[key], str, "a string")
        for key in ("guidance", "gradient_scale"):
            if obj.get(key) is not None:
                _typed(where, key, obj[key], (int, float), "a number")
        for key in ("rtol", "atol"):
            if obj.get(key) is not None and _typed(where, key, obj[key], (int, float), "a number >= 0") < 0:
                raise JobsError(f"{where}: field {key!r}: expected a number >= 0, got {obj[key]}")
        inpaint = obj.get("inpaint")
        if inpaint is not None:
            inpaint = str((path.parent / inpaint) if not Path(inpaint).is_absolute() else Path(inpaint))
        jobs.append(Job(id=job_id, line=lineno, num=num, seed=job_seed, conditions=conditions, steps=steps,
                        sampler=obj.get("sampler"), grid=obj.get("grid"),
                        guidance=None if obj.get("guidance") is None else float(obj["guidance"]),
                        gradient_scale=float(obj.get("gradient_scale", 0.0)),
                        rtol=None if obj.get("rtol") is None else float(obj["rtol"]),
                        atol=None if obj.get("atol") is None else float(obj["atol"]), inpaint=inpaint, mask=obj.get("mask")))
    if not jobs:
        raise JobsError(f"--jobs {path}: no jobs (one JSON object per line expected)")
    return jobs


# --- durable files ---------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single O_APPEND write, then fsync (the commit point of a job)."""
    data = (dumps_json(record, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _kill_point(point: str, job_id: str) -> None:
    """Fault injection for the crash tests: ``MULTIDIFF_JOBS_KILL_AT=POINT:ID`` SIGKILLs this process there."""
    if os.environ.get("MULTIDIFF_JOBS_KILL_AT") == f"{point}:{job_id}":
        os.kill(os.getpid(), signal.SIGKILL)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The complete records of a manifest file; a torn last line (no newline, or not JSON) is ignored."""
    if not path.is_file():
        return []
    out = []
    text = path.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if lineno == text.count("\n") + 1:  # the last, unterminated line: a write cut short
                continue
            raise JobsError(f"{path}:{lineno}: corrupt manifest line (not JSON)") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise JobsError(f"{path}:{lineno}: manifest line without a job 'id'")
        out.append(rec)
    return out


def read_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Finished jobs by id: ``manifest.jsonl`` plus any per-rank shards not merged yet (first record of an id wins)."""
    out = Path(out)
    done: dict[str, dict[str, Any]] = {}
    for path in [out / MANIFEST, *sorted(out.glob(SHARD_GLOB))]:
        for rec in _read_lines(path):
            done.setdefault(str(rec["id"]), rec)
    return done


def _merge_manifest(out: Path, order: dict[str, int]) -> None:
    """Rewrite ``manifest.jsonl`` with every finished job once (jobs-file order), then drop the merged shards."""
    shards = sorted(out.glob(SHARD_GLOB))
    main = out / MANIFEST
    if not shards and (not main.is_file() or main.read_bytes().endswith(b"\n") or main.stat().st_size == 0):
        return
    records = sorted(read_manifest(out).values(), key=lambda r: (order.get(str(r["id"]), 1 << 62), str(r["id"])))
    atomic_write(main, "".join(dumps_json(rec, sort_keys=True) + "\n" for rec in records))
    for shard in shards:
        shard.unlink(missing_ok=True)


def _recover(out: Path, jobs: list[Job]) -> list[str]:
    """Remove what crashed runs left: ``.partial-*`` directories, and job directories whose manifest line is missing."""
    removed = []
    for p in sorted(out.glob(f"{PARTIAL_PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    done = read_manifest(out)
    for job in jobs:
        d = out / job.id
        if job.id not in done and d.exists():
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            removed.append(job.id)
    for tmp in out.glob(f".{MANIFEST}.tmp*"):  # a rewrite of the manifest cut short
        tmp.unlink(missing_ok=True)
    return removed


# --- running -----------------------------------------------------------------------------------------------------------


def job_params(job: Job, model: Any, default_num: int | None) -> tuple[dict[str, Any], Any]:
    """A job's resolved parameters as recorded in the manifest, and its sampler settings: ``rtol`` / ``atol`` only for
    sampler 'adaptive' and ``precision`` only when the model does not run in fp32 (so manifests written before
    either existed still match); a bad setting is a JobsError naming the job."""
    from . import pipeline

    try:
        settings = pipeline.sampler_settings(model, sampler=job.sampler, steps=job.steps, grid=job.grid,
                                             guidance=job.guidance, gradient_scale=job.gradient_scale, rtol=job.rtol,
                                             atol=job.atol)
    except ValueError as e:
        raise JobsError(f"job {job.id!r} (line {job.line}): {e}") from None
    num = job.num if job.num is not None else (default_num if default_num is not None else model.cfg.sample.num)
    params = {"num": num, "seed": job.seed, "conditions": dict(job.conditions), "inpaint": job.inpaint,
              "mask": job.mask, **{k: v for k, v in asdict(settings).items() if v is not None or k not in ("rtol", "atol")}}
    precision = getattr(model.denoiser, "precision", "fp32")
    if precision != "fp32":
        params["precision"] = precision
    return json.loads(dumps_json(params)), settings


def _run_one(model: Any, job: Job, params: dict[str, Any], settings: Any, out: Path, shard: Path, rank: int) -> None:
    """Generate one job into ``.partial-ID``, hash, rename to ``ID``, then append its manifest line."""
    from . import pipeline

    start = time.perf_counter()
    partial = out / f"{PARTIAL_PREFIX}{job.id}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    files, metrics = pipeline.sample_to_dir(model, params["num"], job.conditions, settings, partial,
                                            inpaint=Path(job.inpaint) if job.inpaint else None, mask=job.mask,
                                            seed=job.seed)
    entries = []
    for f in sorted(Path(f) for f in files):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        entries.append({"path": f"{job.id}/{f.relative_to(partial).as_posix()}", "sha256": _sha256(f),
                        "bytes": f.stat().st_size})
    _fsync_dir(partial)
    _kill_point("written", job.id)
    os.rename(partial, out / job.id)
    _fsync_dir(out)
    _kill_point("renamed", job.id)
    _append_line(shard, {"id": job.id, "line": job.line, "params": params, "seed": job.seed, "files": entries,
                         "metrics": metrics, "seconds": round(time.perf_counter() - start, 3), "rank": rank})


def run_jobs(
    model: Any,
    jobs: list[Job],
    out: Path,
    *,
    default_num: int | None = None,
    on_job: Callable[[Job, str], None] | None = None,
) -> dict[str, Any]:
    """Run the jobs not yet in ``out``'s manifest (sharded over torchrun ranks); returns a summary (rank 0's is final).

    The caller holds ``out``'s lock on rank 0. Parameters of a finished job that differ from the jobs file are an
    error naming the job (its samples would not match the request).
    """
    from .distributed import all_gather_object, broadcast_object, dist_env

    out = Path(out)
    env = dist_env()
    order = {j.id: j.line for j in jobs}
    resolved = {j.id: job_params(j, model, default_num) for j in jobs}
    error = None
    if env.is_main:
        try:
            _merge_manifest(out, order)  # shards of an interrupted multi-process run
            _recover(out, jobs)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {e}"
    error = broadcast_object(error)
    if error is not None:
        raise JobsError(error)
    done = read_manifest(out)
    for job in jobs:
        rec = done.get(job.id)
        if rec is not None and rec.get("params") != resolved[job.id][0]:
            raise JobsError(f"job {job.id!r} (line {job.line}) is already in {out / MANIFEST} with other parameters "
                            f"({rec.get('params')} there, {resolved[job.id][0]} now); use a new --out or another id")
    pending = [j for j in jobs if j.id not in done]
    mine = pending[env.rank :: env.world_size]
    shard = out / (MANIFEST if not env.enabled else f".manifest-rank{env.rank}.jsonl")
    ran, failure = [], None
    for job in mine:
        if on_job is not None:
            on_job(job, "start")
        try:
            _run_one(model, job, *resolved[job.id], out, shard, env.rank)
        except Exception as e:  # noqa: BLE001 - every rank reaches the gather below, then all report it
            failure = f"job {job.id!r} (line {job.line}): {type(e).__name__}: {e}"
            break
        ran.append(job.id)
        if on_job is not None:
            on_job(job, "done")
    results = all_gather_object({"rank": env.rank, "ran": ran, "error": failure})
    errors = [r["error"] for r in results if r["error"]]
    summary: dict[str, Any] = {"out": str(out), "jobs": len(jobs), "skipped": len(jobs) - len(pending),
                               "ran": sum(len(r["ran"]) for r in results), "world_size": env.world_size}
    if env.is_main:
        _merge_manifest(out, order)
        if not errors:
            check = verify_manifest(out, [j.id for j in jobs])
            summary.update(manifest=str(out / MANIFEST), verified=check["ok"], problems=check["problems"])
    if errors:
        raise JobsError("; ".join(errors))
    return summary


def verify_manifest(out: Path, ids: list[str] | None = None) -> dict[str, Any]:
    """Check ``out``: every manifest line complete and unique, every listed file present with its sha256, no
    ``.partial-*`` left, and (given ``ids``) exactly those jobs done. Returns ``{ok, jobs, files, problems}``."""
    out = Path(out)
    problems: list[str] = []
    path = out / MANIFEST
    raw = path.read_bytes() if path.is_file() else b""
    if raw and not raw.endswith(b"\n"):
        problems.append(f"{path}: the last line is cut short")
    records = _read_lines(path)
    counts: dict[str, int] = {}
    files = 0
    for rec in records:
        counts[str(rec["id"])] = counts.get(str(rec["id"]), 0) + 1
        for entry in rec.get("files", []):
            files += 1
            f = out / entry["path"]
            if not f.is_file():
                problems.append(f"{f}: listed for job {rec['id']!r} but missing")
            elif _sha256(f) != entry["sha256"]:
                problems.append(f"{f}: sha256 differs from the manifest")
    problems += [f"job {i!r}: {n} manifest lines" for i, n in counts.items() if n > 1]
    problems += [f"{p}: partial output left behind" for p in sorted(out.glob(f"{PARTIAL_PREFIX}*"))]
    problems += [f"{p}: shard not merged" for p in sorted(out.glob(SHARD_GLOB))]
    if ids is not None:
        problems += [f"job {i!r}: not in the manifest" for i in ids if i not in counts]
    return {"ok": not problems, "jobs": len(counts), "files": files, "problems": problems}
