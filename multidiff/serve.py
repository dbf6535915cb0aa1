"""``multidiff serve``: an HTTP server over the one generate path (FastAPI + uvicorn) with dynamic micro-batching.

- ``POST /v1/{domain}/samples``: the knobs of ``multidiff sample`` (num, label / conditions, steps, sampler, grid,
  guidance, rtol / atol for sampler 'adaptive', seed, inpaint upload + mask) as JSON, or as multipart form data (a
  ``params`` JSON field and an ``inpaint`` file). Returns each sample's files (the domain's writer: WAV, or SDF + XYZ;
  binary as base64, text as text) and the domain's metrics. Pictures are lazy: each sample carries a ``figure_url``
  (``GET /v1/{domain}/figures/{id}.png`` renders its spectrogram / molecule drawing when first asked, for the last
  ``max_figures`` samples), so clients that do not look pay nothing; ``figures="inline"`` puts the PNG among the
  files instead, ``"none"`` leaves it out. ``stream=true`` (query or body) answers with
  server-sent events instead: ``queued``, ``progress`` (one per sampler step), ``sample`` (each finished sample),
  ``metrics`` and ``done`` (or ``error``).
- Micro-batching: one worker thread runs the sampler. Queued samples whose domain and sampler settings agree are
  joined into one sampler call (``pipeline.generate_batch``) of up to ``max_batch`` samples, waiting at most
  ``max_wait_ms`` after the oldest one arrived (``wait_from="idle"``: or after the worker became free, whichever is
  later, so that under load the clients answered by one call can rejoin the next instead of the queue splitting into
  two alternating cohorts). Sample i of a request is laid out and noised from seed
  ``seed + i`` alone; with ``exact=True`` every call is padded to ``max_batch`` samples, so a sample is
  bit-identical alone or in a busy batch (CPU kernels otherwise round differently at other batch sizes); as
  sampler 'adaptive' picks its steps for the worst sample of a call, an adaptive request then gets calls of its own.
- Each model runs in the precision ``multidiff serve --precision`` resolves for its domain, as ``multidiff sample``
  (auto: the domain's ``sample_precision``); ``GET /v1/domains`` and every answer say which.
- A bounded queue (429 + Retry-After), 422 naming the field of an invalid request, disconnected clients' waiting
  samples dropped (a running batch is abandoned when all its clients are gone), ``GET /healthz``,
  ``GET /metrics`` (Prometheus), ``GET /v1/domains``, a web page at ``/``; on shutdown the batcher finishes what
  it is running and the requests it has accepted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import random
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import pipeline
from .pipeline import LoadedModel, SamplerSettings
from .registry import SampleRequest

__all__ = ["ServeConfig", "Batcher", "QueueFull", "create_app", "run", "shipped_checkpoint"]

STATIC = Path(__file__).resolve().parent / "static"
TEXT_SUFFIXES = {".sdf": "chemical/x-mdl-sdfile", ".xyz": "chemical/x-xyz", ".json": "application/json",
                 ".txt": "text/plain", ".csv": "text/csv"}
BINARY_SUFFIXES = {".wav": "audio/wav", ".png": "image/png", ".npy": "application/octet-stream"}


def shipped_checkpoint(domain: str) -> Path:
    """The checkpoint shipped in ``data/checkpoints/DOMAIN.safetensors``."""
    return Path(__file__).resolve().parents[1] / "data" / "checkpoints" / f"{domain}.safetensors"


@dataclass
class ServeConfig:
    """Server limits: batching, queue bound, request size."""

    max_batch: int = 16  # samples per sampler call
    max_wait_ms: float = 20.0  # how long a sampler call waits for batch-mates (see wait_from)
    # "arrival": the wait counts from the oldest sample's arrival; "idle": from its arrival or the worker becoming
    # free, whichever is later, so clients whose answers just went out can rejoin the next call (README: measured)
    wait_from: str = "arrival"
    max_queue: int = 256  # samples waiting (not yet in a sampler call); more -> 429
    max_num: int = 64  # samples per request
    max_steps: int = 1000
    max_upload_bytes: int = 5 * 2**20
    max_figures: int = 1024  # recent samples whose picture can still be fetched from their figure_url
    exact: bool = False  # pad every sampler call to max_batch samples: results bit-identical whatever the batch

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_num", "max_steps", "max_upload_bytes", "max_figures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms: expected >= 0, got {self.max_wait_ms}")
        if self.wait_from not in ("idle", "arrival"):
            raise ValueError(f"wait_from (--wait-from): expected 'idle' or 'arrival', got {self.wait_from!r}")
        if self.max_figures < self.max_num:
            raise ValueError(f"max_figures: expected >= max_num ({self.max_num}) so that a request's pictures outlive "
                             f"it, got {self.max_figures}")


class QueueFull(Exception):
    """The bounded queue cannot take a request; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, retry_after: int, waiting: int) -> None:
        super().__init__(f"queue full ({waiting} samples waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class _Abandoned(Exception):
    """Raised from the sampler callback when every client of a running batch has gone."""


@dataclass(eq=False)
class Job:
    """One HTTP request: its samples (one ``SampleRequest`` each), their seeds, and the channel back to the client."""

    domain: str
    model: LoadedModel
    settings: SamplerSettings
    requests: list[SampleRequest]
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    metrics: bool = True
    figures: str = "url"  # 'url' (rendered on request), 'inline' (PNG among the files) or 'none'
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    workdir: Path | None = None  # uploaded file; removed when the job ends
    alone: bool = False  # never share a sampler call with another job (exact mode, sampler 'adaptive')
    enqueued: float = field(default_factory=time.monotonic)
    next: int = 0  # first sample not yet given to a sampler call
    results: dict[int, Any] = field(default_factory=dict)  # decoded samples by index
    cancelled: bool = False
    finished: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        """Samples with equal keys can share a sampler call."""
        r = self.requests[0]
        cond = None if r.cond is None else tuple(sorted(r.cond))
        return (self.domain, self.settings, r.known is not None, cond, tuple(sorted(r.kwargs)),
                id(self) if self.alone else None)

    @property
    def num(self) -> int:
        """Samples of the request."""
        return len(self.requests)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to the client's handler (thread-safe)."""
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (event, data))


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue = Gauge("multidiff_queue_samples", "Samples waiting for a sampler call", registry=self.registry)
        self.running = Gauge("multidiff_running_samples", "Samples in the running sampler call", registry=self.registry)
        self.batch = Histogram("multidiff_batch_samples", "Samples per sampler call (without exact-mode padding)",
                               ["domain"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.batch_seconds = Histogram("multidiff_batch_seconds", "Duration of a sampler call", ["domain"],
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.latency = Histogram("multidiff_request_seconds", "Request latency, arrival to last sample", ["domain"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=self.registry)
        self.served = Counter("multidiff_samples_served", "Samples delivered to clients", ["domain"], registry=self.registry)
        self.dropped = Counter("multidiff_samples_dropped", "Samples dropped because their client disconnected",
                               ["domain"], registry=self.registry)
        self.rejected = Counter("multidiff_requests_rejected", "Requests refused", ["reason"], registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Figures:
    """Pictures of the ``capacity`` most recently served or viewed samples, rendered by the domain's writer when first
    asked for (one render at a time; least recently used forgotten first). Holds each sample decoded, on the CPU."""

    NONE = b""  # the domain drew no picture for the sample

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], tuple[LoadedModel, Any] | bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._render = threading.Lock()  # renders one at a time (matplotlib's pyplot is not thread-safe)
        self.renders = 0

    def add(self, domain: str, key: str, model: LoadedModel, samples: Any) -> None:
        """Remember a decoded sample (an entry already there is kept); the oldest is forgotten beyond ``capacity``."""
        with self._lock:
            if (domain, key) not in self._items:
                self._items[(domain, key)] = (model, samples)
            self._items.move_to_end((domain, key))
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def _get(self, domain: str, key: str) -> tuple[LoadedModel, Any] | bytes | None:
        with self._lock:
            item = self._items.get((domain, key))
            if item is not None:
                self._items.move_to_end((domain, key))
            return item

    def png(self, domain: str, key: str) -> bytes | None:
        """The sample's picture as PNG bytes (rendered once, then kept), ``Figures.NONE`` when its domain draws none,
        or None when it is unknown or forgotten."""
        item = self._get(domain, key)
        if item is None or isinstance(item, bytes):
            return item
        with self._render:
            item = self._get(domain, key)  # rendered by another request meanwhile?
            if item is None or isinstance(item, bytes):
                return item
            model, samples = item
            with tempfile.TemporaryDirectory(prefix="multidiff-figure-") as tmp:
                files, _ = pipeline.write_samples(model, samples, Path(tmp), evaluate=False)
                pngs = [f for f in files if f.suffix.lower() == ".png"]
                data = pngs[0].read_bytes() if pngs else self.NONE
            self.renders += 1
        with self._lock:
            if (domain, key) in self._items:
                self._items[(domain, key)] = data
        return data


class Batcher:
    """Forms sampler calls from queued jobs in one worker thread; encodes finished samples in another."""

    def __init__(self, config: ServeConfig, metrics: Metrics, figures: Figures | None = None) -> None:
        self.config, self.metrics = config, metrics
        self.figures = figures or Figures(config.max_figures)
        self._pending: deque[Job] = deque()
        self._waiting = 0  # samples of pending jobs not yet in a sampler call
        self._cond = threading.Condition()
        self._stopping = False
        self._sample_seconds = 0.5  # running estimate of sampler seconds per sample, for Retry-After
        self._free_since = time.monotonic()  # when the worker last finished a sampler call
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multidiff-writer")
        self._thread = threading.Thread(target=self._run, name="multidiff-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Samples waiting for a sampler call."""
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue a job, or raise ``QueueFull`` (bounded queue) / ``RuntimeError`` (shutting down)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self._waiting + job.num > self.config.max_queue:
                batches = math.ceil((self._waiting + job.num) / self.config.max_batch)
                retry = max(1, math.ceil(batches * self.config.max_batch * self._sample_seconds))
                raise QueueFull(retry, self._waiting)
            self._pending.append(job)
            self._waiting += job.num
            self.metrics.queue.set(self._waiting)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop its samples that are not in a sampler call yet."""
        with self._cond:
            if job.cancelled or job.finished:
                return
            job.cancelled = True
            left = job.num - job.next
            if job in self._pending:
                self._pending.remove(job)
                self._waiting -= left
                self.metrics.queue.set(self._waiting)
            if left:
                self.metrics.dropped.labels(job.domain).inc(left)
            self._cond.notify_all()
        self._cleanup(job)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running sampler call and every accepted job, then stop both threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._writer.shutdown(wait=True)

    # --- worker ------------------------------------------------------------------------------------------------
    def _available(self, key: tuple[Any, ...]) -> int:
        return sum(j.num - j.next for j in self._pending if j.key == key)

    def _take(self) -> list[tuple[Job, int]] | None:
        """Wait for work; return the samples of the next sampler call as (job, index) pairs, None to stop."""
        cfg = self.config
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return None
                head = self._pending[0]
                start = max(head.enqueued, self._free_since) if cfg.wait_from == "idle" else head.enqueued
                key = head.key
                deadline = 0.0 if head.alone else start + cfg.max_wait_ms / 1000.0  # alone: no batch-mates to wait for
                while (self._pending and self._pending[0] is head and self._available(key) < cfg.max_batch
                       and not self._stopping):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._pending and self._pending[0] is head:
                    break  # the head left (cancelled) otherwise: start over with the new head
            taken: list[tuple[Job, int]] = []
            for job in list(self._pending):
                if len(taken) >= cfg.max_batch:
                    break
                if job.key != key:
                    continue
                k = min(job.num - job.next, cfg.max_batch - len(taken))
                taken += [(job, job.next + i) for i in range(k)]
                job.next += k
                if job.next == job.num:
                    self._pending.remove(job)
            self._waiting -= len(taken)
            self.metrics.queue.set(self._waiting)
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                self._sample(taken)
            except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
                for job in {j for j, _ in taken}:
                    self._fail(job, err)
            self._free_since = time.monotonic()

    def _sample(self, taken: list[tuple[Job, int]]) -> None:
        """One sampler call for ``taken``; finished samples go to the writer thread."""
        job0 = taken[0][0]
        model, settings, domain = job0.model, job0.settings, job0.domain
        jobs = list(dict.fromkeys(j for j, _ in taken))
        requests = [j.requests[i] for j, i in taken]
        seeds = [j.seeds[i] for j, i in taken]

        def progress(info: Any) -> None:
            if all(j.cancelled for j in jobs):
                raise _Abandoned
            for j in jobs:
                j.emit("progress", {"step": info.i + 1, "steps": info.steps, "batch": len(taken)})

        self.metrics.batch.labels(domain).observe(len(taken))
        self.metrics.running.set(len(taken))
        start = time.monotonic()
        try:
            xs = pipeline.generate_batch(model, requests, seeds, settings, callback=progress,
                                         pad_to=self.config.max_batch if self.config.exact else None)
        except _Abandoned:
            return
        finally:
            self.metrics.running.set(0)
        seconds = time.monotonic() - start
        self.metrics.batch_seconds.labels(domain).observe(seconds)
        self._sample_seconds = 0.8 * self._sample_seconds + 0.2 * seconds / len(taken)
        for (job, index), x in zip(taken, xs):
            self._writer.submit(self._deliver, job, index, x)

    # --- writer ------------------------------------------------------------------------------------------------
    def _deliver(self, job: Job, index: int, x: torch.Tensor) -> None:
        """Decode and write one sample, send it; after a job's last sample, its metrics and ``done``."""
        if job.cancelled:
            return
        try:
            model, request = job.model, job.requests[index]
            x = x.detach().cpu().clone()  # not a view that keeps the whole batch alive
            samples = pipeline.decode(model, [request], [x])
            with tempfile.TemporaryDirectory(prefix="multidiff-sample-") as tmp:
                files, _ = pipeline.write_samples(model, samples, Path(tmp), evaluate=False,
                                                  figures=job.figures == "inline")
                payload = [_file_payload(f) for f in files]
            digest = hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
            job.results[index] = samples
            event = {"index": index, "seed": job.seeds[index], "digest": digest, "files": payload}
            if job.figures == "url":
                key = f"{digest[:32]}-{job.seeds[index]}"
                self.figures.add(job.domain, key, model, samples)
                event["figure_url"] = f"/v1/{job.domain}/figures/{key}.png"
            job.emit("sample", event)
            self.metrics.served.labels(job.domain).inc()
            if len(job.results) < job.num:
                return
            metrics: dict[str, Any] = {}
            if job.metrics:
                with tempfile.TemporaryDirectory(prefix="multidiff-job-") as tmp:
                    samples = pipeline.merge(model, [job.results[i] for i in range(job.num)])  # decoded once, above
                    _, metrics = pipeline.write_samples(model, samples, Path(tmp), evaluate=True, figures=False)
                job.emit("metrics", _jsonable(metrics))
            self.metrics.latency.labels(job.domain).observe(time.monotonic() - job.enqueued)
            job.finished = True
            job.emit("done", {"num": job.num})
        except Exception as err:  # noqa: BLE001
            self._fail(job, err)
        finally:
            if job.finished:
                self._cleanup(job)

    def _fail(self, job: Job, err: Exception) -> None:
        job.finished = True
        job.emit("error", {"error": f"{type(err).__name__}: {err}"})
        self._cleanup(job)

    @staticmethod
    def _cleanup(job: Job) -> None:
        if job.workdir is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)


def _file_payload(path: Path) -> dict[str, Any]:
    """A written file as JSON: text formats as text, others base64."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return {"name": path.name, "media_type": TEXT_SUFFIXES[suffix], "text": path.read_text()}
    return {"name": path.name, "media_type": BINARY_SUFFIXES.get(suffix, "application/octet-stream"),
            "base64": base64.b64encode(path.read_bytes()).decode("ascii")}


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON (non-finite floats as strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else str(f)


# --- HTTP ------------------------------------------------------------------------------------------------------
class InpaintFile(BaseModel):
    """An uploaded file in a JSON body: its name (for the format) and base64 content."""

    model_config = ConfigDict(extra="forbid")
    filename: str = Field(min_length=1, max_length=255)
    data: str


class SampleBody(BaseModel):
    """``POST /v1/{domain}/samples``: the knobs of ``multidiff sample``; unset ones take the checkpoint's defaults."""

    model_config = ConfigDict(extra="forbid")
    num: int = Field(1, ge=1)
    label: str | int | None = None
    conditions: dict[str, str | int | float] = Field(default_factory=dict)
    steps: int | None = Field(None, ge=1)
    sampler: Literal["ancestral", "ddim", "euler", "euler_maruyama", "heun", "dpmpp_2m", "adaptive"] | None = None
    grid: Literal["uniform", "logsnr", "karras"] | None = None
    guidance: float | None = Field(None, allow_inf_nan=False)
    rtol: float | None = Field(None, ge=0, allow_inf_nan=False)  # sampler 'adaptive' only
    atol: float | None = Field(None, ge=0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**62)
    mask: str | None = None
    inpaint: InpaintFile | None = None
    stream: bool = False
    metrics: bool = True
    figures: Literal["url", "inline", "none"] = "url"


def _invalid(field_name: str, message: str) -> Any:
    """A 422 answer in FastAPI's shape, naming the field."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": [{"loc": ["body", field_name], "msg": message, "type": "value_error"}]}, status_code=422)


def _field_of(message: str, body: SampleBody) -> str:
    """Which request field a domain / settings error is about."""
    head = message.split(":", 1)[0].split(",", 1)[0].strip().lower()
    for name in ("steps", "sampler", "grid", "guidance", "rtol", "atol", "num", "seed"):
        if head == name:
            return name
    lowered = message.lower()
    if body.inpaint is not None and ("inpaint" in lowered or "fragment" in lowered or body.inpaint.filename in message):
        return "inpaint"
    if "--mask" in lowered or "mask" == head:
        return "mask"
    if body.label is not None and "label" in lowered:
        return "label"
    return "conditions"


def create_app(models: dict[str, LoadedModel], config: ServeConfig | None = None) -> Any:
    """The FastAPI app serving ``models`` (domain name -> loaded checkpoint)."""
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

    config = config or ServeConfig()
    metrics = Metrics()
    figures = Figures(config.max_figures)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = Batcher(config, metrics, figures)
        yield
        await asyncio.to_thread(state["batcher"].stop)

    app = FastAPI(title="multidiff", summary="Conditional diffusion for audio waveforms and 3D molecules",
                  lifespan=lifespan)
    app.state.config, app.state.metrics, app.state.models = config, metrics, models

    @app.get("/", include_in_schema=False)
    async def index() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {"status": "ok", "domains": sorted(models), "queue": batcher.waiting if batcher else 0}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Any:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/{domain}/figures/{name}")
    async def figure(domain: str, name: str) -> Any:
        key = name.removesuffix(".png")
        data = await asyncio.to_thread(figures.png, domain, key) if name.endswith(".png") else None
        if data is None:
            return JSONResponse({"detail": f"no figure {name!r} for domain {domain!r}: unknown, or older than the "
                                           f"last {config.max_figures} samples (server --max-figures)"}, status_code=404)
        if data == Figures.NONE:
            return JSONResponse({"detail": f"domain {domain!r} draws no picture of its samples"}, status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/domains")
    async def domains() -> dict[str, Any]:
        return {name: _describe(model, config) for name, model in models.items()}

    @app.post("/v1/{domain}/samples")
    async def samples(domain: str, request: Request) -> Any:
        if domain not in models:
            return JSONResponse({"detail": f"unknown domain {domain!r}; this server has {sorted(models)}"}, status_code=404)
        model = models[domain]
        parsed = await _parse_body(request, config)
        if not isinstance(parsed, SampleBody):
            metrics.rejected.labels("invalid").inc()
            return parsed
        body = parsed
        if request.query_params.get("stream", "").lower() in ("1", "true", "yes"):
            body.stream = True
        if body.num > config.max_num:
            metrics.rejected.labels("invalid").inc()
            return _invalid("num", f"at most {config.max_num} samples per request (server --max-num), got {body.num}")
        if body.steps is not None and body.steps > config.max_steps:
            metrics.rejected.labels("invalid").inc()
            return _invalid("steps", f"at most {config.max_steps} steps, got {body.steps}")
        conditions = {k: str(v) for k, v in body.conditions.items()}
        if body.label is not None:
            conditions["label"] = str(body.label)
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        workdir = inpaint = None
        try:
            settings = pipeline.sampler_settings(model, sampler=body.sampler, steps=body.steps, grid=body.grid,
                                                 guidance=body.guidance, rtol=body.rtol, atol=body.atol)
            if body.inpaint is not None:
                workdir = Path(tempfile.mkdtemp(prefix="multidiff-upload-"))
                inpaint = workdir / ("upload" + Path(body.inpaint.filename).suffix.lower())
                inpaint.write_bytes(base64.b64decode(body.inpaint.data))
            requests = await asyncio.to_thread(pipeline.layout, model, body.num, conditions, inpaint=inpaint,
                                               mask=body.mask, seed=seed)
        except (ValueError, KeyError, FileNotFoundError) as err:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            metrics.rejected.labels("invalid").inc()
            message = str(err).replace(str(inpaint), body.inpaint.filename) if inpaint is not None and body.inpaint else str(err)
            return _invalid(_field_of(message, body), message)
        if len(requests) != body.num:  # a domain without ``merge`` lays out all samples in one piece
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            return JSONResponse({"detail": f"domain {domain!r} cannot be served sample by sample (it defines no merge)"},
                                status_code=501)
        job = Job(domain, model, settings, requests, [seed + i for i in range(body.num)], asyncio.get_running_loop(),
                  metrics=body.metrics, figures=body.figures, workdir=workdir, alone=config.exact and settings.sampler == "adaptive")
        try:
            state["batcher"].submit(job)
        except QueueFull as err:
            Batcher._cleanup(job)
            metrics.rejected.labels("queue_full").inc()
            return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": str(err.retry_after)})
        except RuntimeError as err:
            Batcher._cleanup(job)
            metrics.rejected.labels("shutting_down").inc()
            return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": "5"})
        head = {"domain": domain, "num": body.num, "seed": seed, "settings": _settings_dict(settings),
                "precision": _precision(model), "checkpoint": {"path": str(model.path), "step": model.step}}
        if body.stream:
            return StreamingResponse(_stream(job, head, state["batcher"]), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(job, head, state["batcher"], request)

    return app


def _settings_dict(s: SamplerSettings) -> dict[str, Any]:
    """The sampler settings of an answer (``rtol`` / ``atol`` only for sampler 'adaptive')."""
    out = {"sampler": s.sampler, "steps": s.steps, "grid": s.grid, "guidance": s.guidance,
           "guidance_interval": list(s.guidance_interval) if s.guidance_interval else None}
    if s.sampler == "adaptive":
        out.update(rtol=s.rtol, atol=s.atol)
    return out


def _precision(model: LoadedModel) -> str:
    """The precision the model's backbone runs in ('fp32', 'bf16', 'int8'; ``inference.set_precision``)."""
    return str(getattr(model.denoiser, "precision", "fp32"))


def _describe(model: LoadedModel, config: ServeConfig) -> dict[str, Any]:
    """What a client (the web page) needs to build a request for a domain."""
    scfg = model.cfg.sample
    labels = None
    try:
        labels = pipeline.layout(model, 1, {}, seed=0)[0].meta.get("class_names")
    except Exception:  # noqa: BLE001 - a domain that cannot lay out without conditions has no label list
        pass
    data = model.cfg.data
    return {
        "checkpoint": str(model.path), "step": model.step,
        "defaults": {"sampler": scfg.sampler, "steps": scfg.steps, "grid": scfg.grid, "guidance": scfg.guidance,
                     "rtol": scfg.rtol, "atol": scfg.atol},
        "precision": _precision(model),
        "labels": list(labels) if labels else None,
        "properties": list(getattr(data, "conditioning", None) or []),
        "guided_properties": [],
        "limits": {"max_num": config.max_num, "max_steps": config.max_steps, "max_upload_bytes": config.max_upload_bytes},
    }


async def _parse_body(request: Any, config: ServeConfig) -> SampleBody | Any:
    """The request body (JSON, or multipart with a ``params`` JSON field and an ``inpaint`` file) as ``SampleBody``,
    or a 422 response naming the field."""
    length = request.headers.get("content-length")
    limit = config.max_upload_bytes * 4 // 3 + 65536  # base64 in JSON is 4/3 of the file
    if length is not None and length.isdigit() and int(length) > limit:
        return _invalid("inpaint", f"request of {int(length)} bytes exceeds the upload limit of {config.max_upload_bytes} bytes")
    content_type = request.headers.get("content-type", "")
    upload: tuple[str, bytes] | None = None
    try:
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_part_size=config.max_upload_bytes + 1)
            raw = form.get("params") or "{}"
            data = json.loads(raw if isinstance(raw, str) else (await raw.read()).decode())
            file = form.get("inpaint")
            if file is not None and not isinstance(file, str):
                content = await file.read()
                upload = (file.filename or "upload", content)
        else:
            raw_body = await request.body()
            data = json.loads(raw_body) if raw_body.strip() else {}
    except json.JSONDecodeError as err:
        return _invalid("body", f"invalid JSON: {err}")
    except Exception as err:  # noqa: BLE001 - starlette's multipart errors (e.g. part too large)
        return _invalid("inpaint", f"cannot read the upload: {err}")
    if not isinstance(data, dict):
        return _invalid("body", "expected a JSON object")
    if upload is not None:
        data["inpaint"] = {"filename": upload[0], "data": base64.b64encode(upload[1]).decode("ascii")}
    try:
        body = SampleBody.model_validate(data)
    except ValidationError as err:
        from fastapi.responses import JSONResponse

        detail = [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)
    if body.inpaint is not None:
        try:
            size = len(base64.b64decode(body.inpaint.data, validate=True))
        except ValueError:
            return _invalid("inpaint", "inpaint.data: not valid base64")
        if size > config.max_upload_bytes:
            return _invalid("inpaint", f"upload of {size} bytes exceeds the limit of {config.max_upload_bytes} bytes")
    return body


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _stream(job: Job, head: dict[str, Any], batcher: Batcher) -> AsyncIterator[str]:
    """Server-sent events of one job; a disconnect (the generator is closed) cancels the job."""
    try:
        yield _sse("queued", {**head, "queue": batcher.waiting})
        while True:
            event, data = await job.events.get()
            yield _sse(event, data)
            if event in ("done", "error"):
                return
    finally:
        if not job.finished:
            batcher.cancel(job)


async def _collect(job: Job, head: dict[str, Any], batcher: Batcher, request: Any) -> Any:
    """Wait for a job's samples and metrics and answer with one JSON document; cancel it if the client leaves."""
    from fastapi.responses import JSONResponse

    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {**head, "samples": samples, "metrics": None}
    try:
        while True:
            try:
                event, data = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    batcher.cancel(job)
                    return JSONResponse({"detail": "client disconnected"}, status_code=499)
                continue
            if event == "sample":
                samples.append(data)
            elif event == "metrics":
                result["metrics"] = data
            elif event == "error":
                return JSONResponse({"detail": data["error"]}, status_code=500)
            elif event == "done":
                samples.sort(key=lambda s: s["index"])
                result["elapsed_s"] = time.monotonic() - job.enqueued
                return JSONResponse(result)
    except asyncio.CancelledError:
        batcher.cancel(job)
        raise


def load_models(checkpoints: dict[str, Path], device: str = "cpu", precision: str = "auto") -> dict[str, LoadedModel]:
    """Load each domain's checkpoint once (it must be of that domain), its backbone in ``precision`` resolved per
    domain as ``multidiff sample --precision`` does (auto: the domain's ``sample_precision`` where the CPU runs it)."""
    from .inference import resolve_precision, set_precision

    models = {}
    for domain, path in checkpoints.items():
        model = pipeline.load_model(path, device=device)
        if model.domain.name != domain:
            raise ValueError(f"--checkpoint {domain}={path}: this checkpoint is for domain {model.domain.name!r}")
        set_precision(model.denoiser, resolve_precision(precision, model.domain, device), device)
        models[domain] = model
    return models


def run(checkpoints: dict[str, Path], *, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
        config: ServeConfig | None = None, log_level: str = "info", precision: str = "auto") -> None:
    """Load the checkpoints and serve until interrupted (SIGINT / SIGTERM finish accepted requests first)."""
    import uvicorn

    models = load_models(checkpoints, device, precision)
    app = create_app(models, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
