"""Run-level glue shared by the CLI and library users: configs -> model -> train / sample / evaluate."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .config import ConfigError, config_to_dict, load_config
from .files import write_json
from .diffusion import Denoiser, SelfConditioning
from .guidance import ClassifierFreeGuidance, GradientGuidance, Inpaint
from .registry import Domain, Run, SampleRequest, get_domain, read_run, run_config_class
from .samplers import StepInfo, get_sampler, prior
from .schedules import make_grid
from .training import Trainer, TrainResult

__all__ = [
    "CONFIG_ROOT",
    "find_recipe",
    "load_run_config",
    "build_denoiser",
    "train",
    "Run",
    "load_run",
    "LoadedModel",
    "load_model",
    "generate",
    "SamplerSettings",
    "sampler_settings",
    "layout",
    "join_requests",
    "noise_generators",
    "generate_batch",
    "decode",
    "write_samples",
    "generate_samples",
    "num_sampler_calls",
    "sample_to_dir",
]

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def find_recipe(domain: str, recipe: str | Path | None) -> Path | None:
    """A recipe name ('fast') or a YAML path -> the YAML path; None -> the domain's default recipe if present."""
    if recipe is not None and Path(recipe).suffix in (".yaml", ".yml"):
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    name = recipe if recipe is not None else get_domain(domain).default_recipe
    path = CONFIG_ROOT / domain / f"{name}.yaml"
    if path.is_file():
        return path
    if recipe is None:
        return None  # no default file: the dataclass defaults are the recipe
    known = sorted(p.stem for p in (CONFIG_ROOT / domain).glob("*.yaml"))
    raise ConfigError(f"{path}: no recipe {name!r} for domain {domain!r}; available: {known or 'none'}")


def load_run_config(domain: Domain, recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The typed run config of ``domain`` from a recipe plus dotted overrides."""
    cfg = load_config(find_recipe(domain.name, recipe), run_config_class(domain), overrides)
    if cfg.domain != domain.name:
        raise ConfigError(f"config is for domain {cfg.domain!r}, not {domain.name!r}")
    return cfg


def build_denoiser(domain: Domain, cfg: Any) -> Denoiser:
    """Backbone from the domain, wrapped with the configured schedule / target / weighting / coupling."""
    return Denoiser.from_config(domain.build_backbone(cfg), cfg.diffusion, coupling=domain.coupling(cfg))


class TrainingModule(nn.Module):
    """denoiser + domain loss as one module whose ``forward(batch)`` is the loss, so DDP's hooks see it."""

    def __init__(self, domain: Domain, denoiser: Denoiser) -> None:
        super().__init__()
        self.domain = domain
        self.denoiser = denoiser

    def forward(self, batch: Any) -> Tensor:
        return self.domain.loss(self.denoiser, batch)

    @property
    def compile_target(self) -> nn.Module:
        """What ``train.compile`` compiles: the backbone (the loss around it runs host-side code, e.g. scipy's OT)."""
        return self.denoiser.backbone


def train(
    domain: Domain,
    cfg: Any,
    out_dir: Path,
    *,
    resume: bool | Path = False,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train the configured denoiser; checkpoints (with the resolved config, ``domain.resolve(cfg)``; ``cfg``
    itself is left as it is) and logs go to ``out_dir``."""
    cfg = domain.resolve(cfg)
    torch.manual_seed(cfg.train.seed)
    module = domain.training_module(cfg)
    trainer = Trainer(
        module if module is not None else TrainingModule(domain, build_denoiser(domain, cfg)),
        lambda model, batch: model(batch),
        domain.build_dataset(cfg, "train"),
        cfg.train,
        out_dir,
        collate_fn=domain.collate_fn(cfg),
        run_config=config_to_dict(cfg),
        eval_fn=domain.eval_during_training(cfg),
        device=device,
        progress=progress,
    )
    return trainer.fit(resume=resume)


@dataclass
class LoadedModel:
    """A denoiser with EMA weights, its domain and run config, read from a checkpoint."""

    domain: Domain
    cfg: Any
    denoiser: Denoiser
    step: int | None
    path: Path


load_run = read_run  # checkpoint -> Run(domain, resolved cfg, weights): the one way every caller reads a run


def load_model(checkpoint: Path | str, device: str = "cpu", prefer_ema: bool = True) -> LoadedModel:
    """Rebuild the model from a checkpoint alone (the config travels in the safetensors metadata)."""
    run = load_run(checkpoint)
    denoiser = run.load_into(build_denoiser(run.domain, run.cfg), "denoiser.", prefer_ema=prefer_ema)
    denoiser.to(device).eval().requires_grad_(False)
    return LoadedModel(run.domain, run.cfg, denoiser, run.step, run.path)


def generate(
    model: LoadedModel,
    request: SampleRequest,
    *,
    sampler: str,
    steps: int,
    grid: str = "karras",
    guidance: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    gradient_scale: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    **opts: Any,
) -> Tensor:
    """Sample one request with any core sampler, classifier-free guidance (only for t in ``guidance_interval``
    when given), gradient guidance toward the domain's targets (``Domain.guidance_log_prob``, tempered
    reconstruction guidance) and inpainting as asked."""
    den = model.denoiser
    device = next(den.parameters()).device
    space, kwargs = request.space, request.kwargs

    def cond_denoise(x: Tensor, t: Tensor, cond: dict[str, Tensor] | None, **extra: Any) -> Tensor:
        return den(x, t, cond, space=space, **kwargs, **extra)

    self_cond = SelfConditioning(cond_denoise) if den.self_condition > 0 and model.cfg.sample.self_condition else None
    if self_cond is not None:
        cond_denoise = self_cond  # type: ignore[assignment]

    if guidance != 1.0 and request.cond is not None:
        denoise = ClassifierFreeGuidance(cond_denoise, request.cond, guidance, num_samples=space.num_samples,
                                         batched=request.batched_cfg, interval=guidance_interval)
    else:
        denoise = lambda x, t: cond_denoise(x, t, request.cond)  # noqa: E731
    schedule = den.schedule
    if gradient_scale != 0.0:
        log_prob = model.domain.guidance_log_prob(model.cfg, request)
        denoise = GradientGuidance(denoise, log_prob, schedule, gradient_scale, space=space, through_denoiser=True,
                                   temper=True, clip=model.domain.guidance_clip)
    if self_cond is not None:
        guided = denoise
        denoise = lambda x, t: self_cond.update(guided(x, t))  # noqa: E731
    fn = get_sampler(sampler)
    den.kernel.check_sampler(sampler, opts)  # PFGM++ refuses samplers that inject Gaussian noise
    ts = make_grid(schedule, steps, grid)
    like = request.like.to(device)
    x = prior(schedule, ts[0], like, space, generator, den.kernel)
    if request.known is not None and request.mask is not None:
        wrapped = Inpaint(denoise, request.known.to(device), request.mask.to(device), schedule, space=space,
                          generator=generator, kernel=den.kernel)
        with torch.no_grad():
            out = fn(wrapped, x, ts, schedule, space, generator=generator, callback=callback, **opts)
        return wrapped.finalize(out)
    with torch.no_grad():
        return fn(denoise, x, ts, schedule, space, generator=generator, callback=callback, **opts)


def write_metrics(metrics: dict[str, Any], path: Path) -> Path:
    """Metrics as pretty, strict JSON (undefined values are null)."""
    return write_json(path, metrics)


# --- one generate path: layout -> generate a batch -> decode -> write (used by `multidiff sample` and the server) ---

NOISE_SEED_OFFSET = 0x9E3779B97F4A7C15 % 2**63  # noise streams never reuse a layout seed's stream


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn; requests with equal settings (and domain) can share one sampler call."""

    sampler: str
    steps: int
    grid: str = "karras"
    guidance: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    gradient_scale: float = 0.0
    rtol: float | None = None  # the error tolerances of sampler 'adaptive' (None for every other sampler)
    atol: float | None = None

    def sampler_opts(self) -> dict[str, float]:
        """The keyword options the sampler itself takes: ``rtol`` / ``atol`` for 'adaptive', none for the others."""
        if self.sampler != "adaptive":
            return {}
        return {k: float(v) for k, v in (("rtol", self.rtol), ("atol", self.atol)) if v is not None}


def sampler_settings(
    model: LoadedModel,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    grid: str | None = None,
    guidance: float | None = None,
    gradient_scale: float = 0.0,
    rtol: float | None = None,
    atol: float | None = None,
) -> SamplerSettings:
    """The checkpoint's ``sample`` defaults overridden by the given values, validated (errors name the field).
    ``rtol`` / ``atol`` are for sampler 'adaptive' only (default: the checkpoint's ``sample.rtol`` / ``sample.atol``);
    given with another sampler they are an error, and that sampler's settings carry None for them."""
    import math

    from .registry import check_tolerances
    from .samplers import SAMPLERS
    from .schedules import GRIDS

    scfg = model.cfg.sample
    chosen = sampler if sampler is not None else scfg.sampler
    if chosen != "adaptive":
        given = [name for name, value in (("rtol", rtol), ("atol", atol)) if value is not None]
        if given:
            raise ValueError(f"{given[0]}: applies to sampler 'adaptive' only (the error tolerance of its steps); "
                             f"this request samples with {chosen!r}: drop {' and '.join(given)} or use sampler 'adaptive'")
    else:
        check_tolerances(rtol, atol)
        rtol = float(rtol if rtol is not None else scfg.rtol)
        atol = float(atol if atol is not None else scfg.atol)
        check_tolerances(rtol, atol)
    s = SamplerSettings(
        sampler=chosen,
        steps=steps if steps is not None else scfg.steps,
        grid=grid if grid is not None else scfg.grid,
        guidance=float(guidance if guidance is not None else scfg.guidance),
        guidance_interval=tuple(scfg.guidance_interval) if scfg.guidance_interval is not None else None,  # type: ignore[arg-type]
        gradient_scale=float(gradient_scale),
        rtol=rtol,
        atol=atol,
    )
    if s.sampler not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {s.sampler!r}; expected one of {sorted(SAMPLERS)}")
    if s.grid not in GRIDS:
        raise ValueError(f"grid: unknown grid {s.grid!r}; expected one of {sorted(GRIDS)}")
    if isinstance(s.steps, bool) or not isinstance(s.steps, int) or s.steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {s.steps!r}")
    if not math.isfinite(s.guidance):
        raise ValueError(f"guidance: expected a finite scale, got {s.guidance}")
    if not math.isfinite(s.gradient_scale):
        raise ValueError(f"gradient_scale: expected a finite scale, got {s.gradient_scale}")
    return s


def per_sample_layout(domain: Domain) -> bool:
    """Whether ``domain`` can decode samples one by one and merge them (``Domain.merge``), so each is laid out alone."""
    return type(domain).merge is not Domain.merge


def num_samples(request: SampleRequest) -> int:
    """How many samples a request lays out."""
    n = request.space.num_samples
    return int(n) if n is not None else int(request.like.shape[0])


def layout(
    model: LoadedModel,
    num: int,
    conditions: dict[str, str],
    *,
    inpaint: Path | None = None,
    mask: str | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """Lay out ``num`` samples: sample i alone with seed ``seed + i`` (its label, size, drawn properties), so it
    depends on nothing but its own seed; a domain without ``merge`` gets one request for all ``num``."""
    if num < 1:
        raise ValueError(f"num: expected >= 1 samples, got {num}")
    dom = model.domain
    if not per_sample_layout(dom):
        return [dom.request(model.cfg, num, conditions, inpaint, mask, seed)]
    return [dom.request(model.cfg, 1, conditions, inpaint, mask, seed + i) for i in range(num)]


def noise_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One noise generator per sample; sample seed s draws its noise from stream ``s + NOISE_SEED_OFFSET``."""
    return [torch.Generator(device=device).manual_seed((int(s) + NOISE_SEED_OFFSET) % 2**63) for s in seeds]


def _join_values(key: str, values: list[Any], counts: list[int]) -> Any:
    """Join one meta entry of several requests: per-sample entries (length = the request's samples) are
    concatenated, shared ones kept when equal; unequal shared entries raise KeyError (dropped by the caller)."""
    first = values[0]
    if isinstance(first, Tensor):
        if all(isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n for v, n in zip(values, counts)):
            return torch.cat(values)
        if all(isinstance(v, Tensor) and v.shape == first.shape and torch.equal(v, first) for v in values):
            return first
        raise KeyError(key)
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
            raise KeyError(key)
        return {k: _join_values(f"{key}.{k}", [v[k] for v in values], counts) for k in first}
    if isinstance(first, (list, tuple)):
        if all(v == first for v in values) and not all(len(v) == n for v, n in zip(values, counts)):
            return first
        if all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, counts)):
            return [x for v in values for x in v]
        raise KeyError(key)
    if all(v == first for v in values):
        return first
    raise KeyError(key)


def _join_space(spaces: list[Any], counts: list[int], rows: list[int]) -> Any:
    """One space for several requests' spaces of the same type: graph indices offset, per-node / per-graph
    tensors concatenated, products joined part by part."""
    import copy

    from .spaces import Euclidean, Graph, Product

    first = spaces[0]
    if any(type(s) is not type(first) for s in spaces):
        raise ValueError(f"cannot join requests laid out in different spaces: {sorted({type(s).__name__ for s in spaces})}")
    if isinstance(first, Euclidean):
        return first
    if isinstance(first, Product):
        if any([sl for sl, _ in s.parts] != [sl for sl, _ in first.parts] for s in spaces):
            raise ValueError("cannot join Product spaces with different slices")
        joined = copy.copy(first)
        new_parts = [(sl, _join_space([s.parts[k][1] for s in spaces], counts, rows)) for k, (sl, _) in enumerate(first.parts)]
        for name, value in vars(first).items():  # attributes aliasing a part (e.g. ``positions``) follow it
            for k, (_, part) in enumerate(first.parts):
                if value is part:
                    setattr(joined, name, new_parts[k][1])
        joined.parts = new_parts
        return joined
    if isinstance(first, Graph):
        joined = copy.copy(first)
        offsets = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()
        for name, value in vars(first).items():
            if not isinstance(value, Tensor):
                continue
            values = [getattr(s, name) for s in spaces]
            if name == "batch":
                setattr(joined, name, torch.cat([v + o for v, o in zip(values, offsets)]))
            elif all(v.ndim > 0 and v.shape[0] in (n, r) for v, n, r in zip(values, counts, rows)):
                setattr(joined, name, torch.cat(values))
            else:
                raise ValueError(f"cannot join {type(first).__name__} spaces: tensor {name!r} is neither per node nor per graph")
        joined._num_graphs = sum(counts)
        return joined
    from .spaces import Space

    joined = copy.copy(first)  # any other space: join the spaces it wraps, keep equal settings
    for name, value in vars(first).items():
        values = [vars(s).get(name) for s in spaces]
        if isinstance(value, Space):
            setattr(joined, name, _join_space(values, counts, rows))
        elif isinstance(value, Tensor) or any(v != value for v in values):
            raise ValueError(f"cannot join {type(first).__name__} spaces: {name!r} differs or is a tensor")
    return joined


def join_requests(requests: Sequence[SampleRequest]) -> SampleRequest:
    """One request for the samples of several (of one domain and model): rows, conditions, inpainting parts and
    backbone kwargs concatenated, the graph index ``kwargs['batch']`` offset; each keeps its own conditions."""
    if len(requests) == 1:
        return requests[0]
    counts = [num_samples(r) for r in requests]
    rows = [int(r.like.shape[0]) for r in requests]
    first = requests[0]
    if any((r.cond is None) != (first.cond is None) or (r.cond is not None and r.cond.keys() != first.cond.keys())
           for r in requests):
        raise ValueError("cannot join requests with different condition keys")
    if any((r.known is None) != (first.known is None) for r in requests):
        raise ValueError("cannot join inpainting requests with plain ones")
    if any(r.kwargs.keys() != first.kwargs.keys() for r in requests):
        raise ValueError("cannot join requests with different backbone kwargs")
    offsets = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()
    kwargs: dict[str, Any] = {}
    for key, value in first.kwargs.items():
        values = [r.kwargs[key] for r in requests]
        if key == "batch" and isinstance(value, Tensor):  # the PyG graph index of node rows
            kwargs[key] = torch.cat([v + o for v, o in zip(values, offsets)])
        elif isinstance(value, Tensor):
            kwargs[key] = torch.cat(values)
        elif all(v == value for v in values):
            kwargs[key] = value
        else:
            raise ValueError(f"cannot join requests whose backbone kwarg {key!r} differs")
    meta: dict[str, Any] = {}
    for key in first.meta:
        if all(key in r.meta for r in requests):
            try:
                meta[key] = _join_values(key, [r.meta[key] for r in requests], counts)
            except KeyError:
                pass  # request-specific (e.g. an uploaded file): decode uses each request's own meta
    cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(r, name) for r in requests])  # noqa: E731
    return SampleRequest(
        like=torch.cat([r.like for r in requests]),
        space=_join_space([r.space for r in requests], counts, rows),
        cond=None if first.cond is None else {k: torch.cat([r.cond[k] for r in requests]) for k in first.cond},  # type: ignore[index]
        kwargs=kwargs, known=cat("known"), mask=cat("mask"), batched_cfg=all(r.batched_cfg for r in requests), meta=meta,
    )


def generate_batch(
    model: LoadedModel,
    requests: Sequence[SampleRequest],
    seeds: Sequence[int],
    settings: SamplerSettings,
    *,
    pad_to: int | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> list[Tensor]:
    """Sample several requests in one sampler call, sample k with its own noise stream ``seeds[k]``; returns each
    request's rows. Layout and noise of a sample depend only on its request and seed; the network's arithmetic
    can still round differently at another batch size (CPU kernels are chosen by shape), so ``pad_to`` fills the
    call with copies of the first one-sample request up to that many samples: at one fixed batch size a sample's
    result is bit-identical whatever its batch-mates."""
    total = sum(num_samples(r) for r in requests)
    if len(seeds) != total:
        raise ValueError(f"seeds: expected one per sample ({total}), got {len(seeds)}")
    batch, batch_seeds = list(requests), list(seeds)
    if pad_to is not None and total < pad_to and num_samples(requests[0]) == 1:
        batch += [requests[0]] * (pad_to - total)
        batch_seeds += [seeds[0]] * (pad_to - total)
    device = next(model.denoiser.parameters()).device
    x = generate(model, join_requests(batch), sampler=settings.sampler, steps=settings.steps, grid=settings.grid,
                 guidance=settings.guidance, guidance_interval=settings.guidance_interval,
                 gradient_scale=settings.gradient_scale, generator=noise_generators(batch_seeds, device), callback=callback,
                 **settings.sampler_opts())
    return list(x.split([int(r.like.shape[0]) for r in batch]))[: len(requests)]


def decode(model: LoadedModel, requests: Sequence[SampleRequest], xs: Sequence[Tensor]) -> Any:
    """Decode each request's rows with its own request and merge them into one set of samples."""
    return merge(model, [model.domain.decode(x, r) for x, r in zip(xs, requests)])


def merge(model: LoadedModel, parts: Sequence[Any]) -> Any:
    """Decoded parts (each from ``decode``) joined into one set of samples, in order."""
    return parts[0] if len(parts) == 1 else model.domain.merge(list(parts))


def _takes_figures(domain: Any) -> bool:
    """Whether ``domain.write`` accepts ``figures`` (plugin domains written against the older contract do not)."""
    params = inspect.signature(domain.write).parameters
    return "figures" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def write_samples(model: LoadedModel, samples: Any, out: Path, *, evaluate: bool = True,
                  figures: bool = True) -> tuple[list[Path], dict[str, Any]]:
    """Write samples with the domain's writer into ``out`` (pictures too unless ``figures=False``); with ``evaluate``
    also their metrics (``metrics.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if figures or _takes_figures(model.domain):
        files = list(model.domain.write(samples, out, **({} if figures else {"figures": False})))
    else:  # a domain written before ``figures`` existed: it draws them anyway; they are left out of the answer
        files = [f for f in model.domain.write(samples, out) if Path(f).suffix.lower() != ".png"]
    metrics: dict[str, Any] = {}
    if evaluate:
        metrics = model.domain.evaluate(out, model.cfg)
        files.append(write_metrics(metrics, out / "metrics.json"))
    return files, metrics


def generate_samples(
    model: LoadedModel,
    num: int,
    conditions: dict[str, str],
    settings: SamplerSettings,
    *,
    inpaint: Path | None = None,
    mask: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    callback: Callable[[StepInfo, int], None] | None = None,
) -> Any:
    """Lay out ``num`` samples (sample i has seed ``seed + i``), generate them in sampler calls of at most
    ``batch_size`` samples and decode them into one set; ``callback(info, done_steps)`` reports progress."""
    requests = layout(model, num, conditions, inpaint=inpaint, mask=mask, seed=seed)
    size = max(1, batch_size if batch_size is not None else model.cfg.sample.batch_size)
    xs: list[Tensor] = []
    k = start = 0
    for chunk_start in range(0, len(requests), size):
        chunk = requests[chunk_start : chunk_start + size]
        n = sum(num_samples(r) for r in chunk)
        step_cb = None if callback is None else (lambda info, done=k * settings.steps: callback(info, done))
        xs += generate_batch(model, chunk, range(seed + start, seed + start + n), settings, callback=step_cb)
        start += n
        k += 1
    return decode(model, requests, xs)


def num_sampler_calls(model: LoadedModel, num: int, batch_size: int | None = None) -> int:
    """How many sampler calls ``generate_samples`` makes for ``num`` samples (for progress totals)."""
    if not per_sample_layout(model.domain):
        return 1
    size = max(1, batch_size if batch_size is not None else model.cfg.sample.batch_size)
    return -(-num // size)


def sample_to_dir(
    model: LoadedModel,
    num: int,
    conditions: dict[str, str],
    settings: SamplerSettings,
    out: Path,
    *,
    inpaint: Path | None = None,
    mask: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    callback: Callable[[StepInfo, int], None] | None = None,
    before_write: Callable[[], None] | None = None,
    evaluate: bool = True,
) -> tuple[list[Path], dict[str, Any]]:
    """``multidiff sample`` and batch jobs: ``generate_samples`` then ``write_samples`` into ``out`` (files + metrics);
    ``before_write()`` runs once the samples exist, before any file is written (``--overwrite`` clears old ones)."""
    samples = generate_samples(model, num, conditions, settings, inpaint=inpaint, mask=mask, seed=seed,
                               batch_size=batch_size, callback=callback)
    if before_write is not None:
        before_write()
    return write_samples(model, samples, out, evaluate=evaluate)
