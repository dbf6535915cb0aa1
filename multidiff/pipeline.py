"""Run-level glue shared by the CLI and library users: configs -> model -> train / sample / evaluate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint_for_sampling
from .config import ConfigError, config_from_dict, config_to_dict, load_config
from .files import write_json
from .diffusion import Denoiser
from .guidance import ClassifierFreeGuidance, GradientGuidance, Inpaint
from .registry import Domain, SampleRequest, get_domain, run_config_class
from .samplers import StepInfo, get_sampler, prior
from .schedules import make_grid
from .training import Trainer, TrainResult

__all__ = [
    "CONFIG_ROOT",
    "find_recipe",
    "load_run_config",
    "build_denoiser",
    "train",
    "LoadedModel",
    "load_model",
    "generate",
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
    """Backbone from the domain, wrapped with the configured schedule / target / weighting."""
    return Denoiser.from_config(domain.build_backbone(cfg), cfg.diffusion)


class TrainingModule(nn.Module):
    """denoiser + domain loss as one module whose ``forward(batch)`` is the loss, so DDP's hooks see it."""

    def __init__(self, domain: Domain, denoiser: Denoiser) -> None:
        super().__init__()
        self.domain = domain
        self.denoiser = denoiser

    def forward(self, batch: Any) -> Tensor:
        return self.domain.loss(self.denoiser, batch)


def train(
    domain: Domain,
    cfg: Any,
    out_dir: Path,
    *,
    resume: bool | Path = False,
    device: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train the configured denoiser; checkpoints (with the resolved config) and logs go to ``out_dir``."""
    torch.manual_seed(cfg.train.seed)
    module = domain.training_module(cfg)
    trainer = Trainer(
        module if module is not None else TrainingModule(domain, build_denoiser(domain, cfg)),
        lambda model, batch: model(batch),
        domain.build_dataset(cfg, "train"),
        cfg.train,
        out_dir,
        collate_fn=domain.collate,
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


def load_model(checkpoint: Path | str, device: str = "cpu", prefer_ema: bool = True) -> LoadedModel:
    """Rebuild the model from a checkpoint alone (the config travels in the safetensors metadata)."""
    ckpt = load_checkpoint_for_sampling(checkpoint)
    raw = ckpt.config
    if "domain" not in raw:
        raise ConfigError(f"{ckpt.path}: the checkpoint's config has no 'domain' (not written by multidiff train?)")
    domain = get_domain(raw["domain"])
    cfg = config_from_dict(run_config_class(domain), raw, source=f"{ckpt.path} (embedded config)")
    denoiser = build_denoiser(domain, cfg)
    prefix = "denoiser."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in ckpt.weights(prefer_ema).items()}
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt.path}: weights do not match the model built from its config "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )
    denoiser.to(device).eval().requires_grad_(False)
    return LoadedModel(domain, cfg, denoiser, ckpt.step, ckpt.path)


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

    def cond_denoise(x: Tensor, t: Tensor, cond: dict[str, Tensor] | None) -> Tensor:
        return den(x, t, cond, space=space, **kwargs)

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
    ts = make_grid(schedule, steps, grid)
    like = request.like.to(device)
    x = prior(schedule, ts[0], like, space, generator)
    fn = get_sampler(sampler)
    if request.known is not None and request.mask is not None:
        wrapped = Inpaint(denoise, request.known.to(device), request.mask.to(device), schedule, space=space, generator=generator)
        with torch.no_grad():
            out = fn(wrapped, x, ts, schedule, space, generator=generator, callback=callback, **opts)
        return wrapped.finalize(out)
    with torch.no_grad():
        return fn(denoise, x, ts, schedule, space, generator=generator, callback=callback, **opts)


def write_metrics(metrics: dict[str, Any], path: Path) -> Path:
    """Metrics as pretty, strict JSON (undefined values are null)."""
    return write_json(path, metrics)
