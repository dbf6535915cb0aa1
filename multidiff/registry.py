"""The Domain protocol and the registry of domains (entry-point group ``multidiff.domains``).

A domain is one object that bundles what the core cannot know: how to build its dataset and backbone,
how a collated batch maps to (x0, conditions, backbone kwargs) and to the space its noise lives in,
how a sampling request is laid out, and how samples are decoded, written and evaluated.
The order of calls is fixed and explicit (``multidiff.pipeline`` follows it):

1. ``cfg = domain.resolve(cfg)`` once, before training or sampling: a **pure** function that returns the
   run config with everything derived from the data filled in (e.g. class names, dataset statistics), so
   that the checkpoint's embedded config alone rebuilds the model; it never changes its argument.
2. ``domain.build_dataset(cfg, split)``, ``domain.collate_fn(cfg)`` (a collate function that depends only
   on the resolved config it was made from, never on state left by an earlier call), ``build_backbone(cfg)``.
3. ``unpack`` / ``space`` / ``loss`` per batch; ``request`` / ``decode`` / ``merge`` / ``write`` / ``evaluate``
   to sample.

Every method takes the typed run config ``RunConfig[DataT, ModelT]`` (``DataT`` / ``ModelT`` = the domain's
``DataConfig`` / ``ModelConfig`` classes). A third-party package registers a domain with

    [project.entry-points."multidiff.domains"]
    mydomain = "mypackage.domain:MyDomain"

See ``multidiff/toy.py`` for a complete, small example.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Literal, Protocol, TypeVar

from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from .checkpoint import LoadedCheckpoint, load_checkpoint_for_sampling
from .config import ConfigError, config_from_dict, positive
from .diffusion import Denoiser, DiffusionConfig
from .spaces import Space
from .training import TrainConfig

__all__ = ["SampleConfig", "check_tolerances", "SampleRequest", "RunConfig", "Domain", "Run", "read_run", "get_domain", "available_domains", "run_config_class", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "multidiff.domains"


@dataclass
class SampleConfig:
    """Defaults of ``multidiff sample``: sampler, grid, steps, guidance scale, how many and in what batches."""

    sampler: Literal["ancestral", "ddim", "euler", "euler_maruyama", "heun", "dpmpp_2m", "adaptive"] = "dpmpp_2m"
    grid: Literal["uniform", "logsnr", "karras"] = "karras"
    steps: int = positive(25)
    guidance: float = 1.0
    guidance_interval: tuple[float, float] | None = None  # CFG only for lo < t <= hi (Kynkaanniemi et al. 2024)
    num: int = positive(16)
    batch_size: int = positive(64)
    rtol: float = 0.003  # sampler 'adaptive' only: relative / absolute error tolerance per step
    atol: float = 0.003
    self_condition: bool = True  # a self-conditioned model (diffusion.self_condition > 0) gets each step the previous
    #                              x0 estimate; false: the no-estimate input it also learned (a distilled student)

    def __post_init__(self) -> None:
        """Reject tolerances the adaptive sampler cannot use (errors name ``sample.rtol`` / ``sample.atol``)."""
        check_tolerances(self.rtol, self.atol, prefix="sample.")


def check_tolerances(rtol: float | None, atol: float | None, *, prefix: str = "") -> None:
    """Raise ValueError naming ``{prefix}rtol`` / ``{prefix}atol`` unless each given one is a finite number >= 0 and
    they are not both 0 (None: not given)."""
    import math

    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{prefix}{name}: expected a finite number >= 0, got {value!r}")
    if rtol is not None and atol is not None and rtol == 0 and atol == 0:
        raise ValueError(f"{prefix}rtol, {prefix}atol: expected at least one of them > 0 (a zero tolerance never "
                         f"accepts a step), got both 0")


@dataclass
class SampleRequest:
    """What the core needs to sample one batch: a template, its space, conditions and backbone kwargs."""

    like: Tensor
    space: Space
    cond: dict[str, Tensor] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    known: Tensor | None = None  # inpainting: values to keep where ``mask`` is True
    mask: Tensor | None = None
    batched_cfg: bool = True  # False when x cannot simply be concatenated (graph batches)
    meta: dict[str, Any] = field(default_factory=dict)


DataT = TypeVar("DataT")
ModelT = TypeVar("ModelT")


class RunConfig(Protocol[DataT, ModelT]):
    """The typed run config of a domain (made by ``run_config_class``): its ``data`` / ``model`` sections are the
    domain's ``DataConfig`` / ``ModelConfig``, the others are the core's."""

    domain: str
    data: DataT
    model: ModelT
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig


class Domain(ABC, Generic[DataT, ModelT]):
    """One data modality: data adapters, backbone, space, sampling layout, metrics and writers.

    Subclass it as ``class MyDomain(Domain[MyData, MyModel])`` with ``DataConfig = MyData`` and
    ``ModelConfig = MyModel``; ``multidiff/toy.py`` implements every method a new domain usually needs.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    DataConfig: ClassVar[type]
    ModelConfig: ClassVar[type]
    default_recipe: ClassVar[str] = "default"
    guidance_clip: ClassVar[float | None] = None  # bound on each entry of a gradient-guidance correction per call
    # Glob patterns of the files ``write`` creates in its directory: what ``multidiff sample --overwrite`` deletes first
    output_patterns: ClassVar[tuple[str, ...]] = ()

    # --- data and model ---------------------------------------------------------------------------
    def resolve(self, cfg: RunConfig[DataT, ModelT]) -> RunConfig[DataT, ModelT]:
        """The run config with what is derived from the data filled in (class names, statistics the model needs
        at sampling), validated. **Pure**: returns a new config (``dataclasses.replace``) or ``cfg`` itself when
        there is nothing to fill, and never changes ``cfg``. Called once before training (its result is what
        the checkpoint embeds) and when a checkpoint is loaded (a no-op then). Default: ``cfg`` unchanged."""
        return cfg

    @abstractmethod
    def build_dataset(self, cfg: RunConfig[DataT, ModelT], split: str = "train") -> Dataset:
        """The dataset of a split ('train', 'valid', 'test')."""

    def collate_fn(self, cfg: RunConfig[DataT, ModelT]) -> Callable[[list[Any]], Any]:
        """The function that collates dataset items into a batch, for the resolved ``cfg``: everything it needs
        comes from ``cfg`` when it is made (no state of the domain object). Default: torch's ``default_collate``."""
        return default_collate

    @abstractmethod
    def build_backbone(self, cfg: RunConfig[DataT, ModelT]) -> nn.Module:
        """The backbone ``forward(x_in, c_noise, cond, **kwargs)``."""

    @abstractmethod
    def unpack(self, batch: Any) -> tuple[Tensor, dict[str, Tensor] | None, dict[str, Any]]:
        """A collated batch -> (x0, conditions, backbone kwargs)."""

    @abstractmethod
    def space(self, batch: Any) -> Space:
        """The space the noise of this batch lives in."""

    def training_module(self, cfg: RunConfig[DataT, ModelT]) -> nn.Module | None:
        """Optional: a module whose ``forward(batch)`` is the loss, for recipes that train something other
        than the denoiser (e.g. an evaluation classifier). None (default) trains the configured denoiser."""
        return None

    def loss(self, denoiser: Denoiser, batch: Any) -> Tensor:
        """The training loss of one batch."""
        x0, cond, kwargs = self.unpack(batch)
        return denoiser.loss(x0, cond, space=self.space(batch), **kwargs)

    def coupling(self, cfg: RunConfig[DataT, ModelT]) -> Callable[[Tensor, Tensor, Space], Tensor] | None:
        """The noise <-> data coupling named by ``cfg.diffusion.coupling`` (None: independent draws)."""
        if cfg.diffusion.coupling is None:
            return None
        raise ValueError(f"diffusion.coupling={cfg.diffusion.coupling!r}: domain {self.name!r} defines no coupling "
                         f"(expected null)")

    def prepare_data(self, cfg: RunConfig[DataT, ModelT]) -> dict[str, Any]:
        """Build / cache the data of a recipe (``multidiff data DOMAIN``); returns a summary."""
        return {split: len(self.build_dataset(cfg, split)) for split in ("train",)}

    # --- sampling --------------------------------------------------------------------------------
    @abstractmethod
    def request(self, cfg: RunConfig[DataT, ModelT], num: int, conditions: dict[str, str], inpaint: Path | None = None,
                mask: str | None = None, seed: int = 0) -> SampleRequest:
        """Lay out a batch of ``num`` samples with conditions given as strings (``--condition k=v``)."""

    @abstractmethod
    def decode(self, x: Tensor, request: SampleRequest) -> Any:
        """Sampler output -> domain samples (e.g. waveforms, molecules)."""

    def merge(self, parts: list[Any]) -> Any:
        """Optional: join the decoded samples of consecutive chunks (lets ``multidiff sample`` bound memory by
        ``sample.batch_size``); domains without it are sampled in one batch."""
        raise NotImplementedError

    @abstractmethod
    def write(self, samples: Any, out_dir: Path, *, figures: bool = True) -> list[Path]:
        """Write samples (files a user opens) into ``out_dir``; ``figures=False`` leaves out the pictures (PNG), which
        ``multidiff serve`` renders only when a client asks for them."""

    @abstractmethod
    def evaluate(self, path: Path, cfg: RunConfig[DataT, ModelT] | None = None) -> dict[str, float]:
        """Metrics of samples written by ``write`` (a file or directory)."""

    def guidance_log_prob(self, cfg: RunConfig[DataT, ModelT], request: SampleRequest) -> Callable[[Tensor, Tensor], Tensor]:
        """Optional: ``log_prob(x0, t) -> [B]`` of the request's targets, for gradient guidance (``--gradient-scale``)."""
        raise ValueError(f"domain {self.name!r} has no gradient guidance (it defines no predictor of its conditions)")

    def eval_during_training(self, cfg: RunConfig[DataT, ModelT]) -> Any:
        """Optional ``eval_fn(ema_model, step) -> metrics`` used every ``train.eval_every`` steps."""
        return None


def available_domains() -> dict[str, str]:
    """Registered domain names -> entry-point targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_domain(name: str) -> Domain:
    """Instantiate a registered domain by name."""
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in eps:
        raise ValueError(
            f"unknown domain {name!r}; registered domains: {sorted(eps) or 'none'} "
            f"(entry-point group {ENTRY_POINT_GROUP!r}; is the package installed with `pip install -e .`?)"
        )
    cls = eps[name].load()
    return cls()


_RUN_CLASSES: dict[str, type] = {}


def run_config_class(domain: Domain) -> type:
    """The typed run config of a domain: domain, data, model, diffusion, train, sample sections."""
    key = domain.name
    if key not in _RUN_CLASSES:
        _RUN_CLASSES[key] = dataclasses.make_dataclass(
            f"{type(domain).__name__}RunConfig",
            [
                ("domain", str, field(default=domain.name)),
                ("data", domain.DataConfig, field(default_factory=domain.DataConfig)),
                ("model", domain.ModelConfig, field(default_factory=domain.ModelConfig)),
                ("diffusion", DiffusionConfig, field(default_factory=DiffusionConfig)),
                ("train", TrainConfig, field(default_factory=TrainConfig)),
                ("sample", SampleConfig, field(default_factory=SampleConfig)),
            ],
        )
    return _RUN_CLASSES[key]


# --- a checkpoint as (domain, config, weights) -------------------------------------------------------------------


@dataclass
class Run:
    """A checkpoint read with its domain: the typed, resolved run config and the stored weights."""

    domain: Domain
    cfg: Any
    checkpoint: LoadedCheckpoint

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def step(self) -> int | None:
        return self.checkpoint.step

    def load_into(self, module: nn.Module, prefix: str = "", *, prefer_ema: bool = True, what: str = "model") -> nn.Module:
        """Load the (EMA) weights into ``module``, a model built from ``cfg``: the keys under ``prefix`` with it
        stripped (all keys when none has it); a mismatch raises ``ConfigError`` naming the checkpoint."""
        weights = self.checkpoint.weights(prefer_ema)
        if prefix and any(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{self.path}: weights do not match the {what} built from its config "
                              f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
        return module


def read_run(checkpoint: Path | str | LoadedCheckpoint, domain: Domain | None = None) -> Run:
    """A run directory, checkpoint directory or ``.safetensors`` file (or a checkpoint already loaded) -> its
    ``Run``: the domain named in the embedded config (looked up in the registry when ``domain`` is None; a given
    ``domain`` must be the checkpoint's, which is how domain code reads its own checkpoints without a lookup), the
    typed config through ``domain.resolve``, and the weights. ``multidiff.pipeline.load_run`` is this function."""
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint_for_sampling(checkpoint)
    raw = ckpt.config
    if "domain" not in raw:
        raise ConfigError(f"{ckpt.path}: the checkpoint's config has no 'domain' (not written by multidiff train?)")
    if domain is None:
        domain = get_domain(raw["domain"])
    elif raw["domain"] != domain.name:
        raise ConfigError(f"{ckpt.path}: a checkpoint of domain {raw['domain']!r}, not {domain.name!r}")
    cfg = config_from_dict(run_config_class(domain), raw, source=f"{ckpt.path} (embedded config)")
    return Run(domain, domain.resolve(cfg), ckpt)
