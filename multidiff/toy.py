"""The toy domain: class-conditional 2-D Gaussian mixtures — the "write your own domain" example.

Data: ``components`` Gaussians on a ring, label = component. Backbone: an MLP with Fourier noise-level
features and a label embedding with a null class for classifier-free guidance. Metrics: sliced
Wasserstein distance to fresh data and conditional accuracy (share of samples nearest to the mean of
the component they were asked for). Samples are written as CSV (x, y, label) plus a PNG scatter.

    multidiff train toy train.steps=400 --out runs/toy
    multidiff sample toy --checkpoint runs/toy --num 2000 --condition label=3
    multidiff evaluate toy runs/toy/samples
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from .analytic import GaussianMixture, sliced_wasserstein
from .config import positive
from .guidance import UNCOND
from .registry import Domain, RunConfig, SampleRequest
from .spaces import Euclidean, Space

__all__ = ["ToyDomain", "ToyData", "ToyModel", "ToyMLP", "toy_mixture"]


@dataclass
class ToyData:
    """The mixture and how many training points to draw from it."""

    components: int = positive(8)
    radius: float = 4.0
    std: float = positive(0.35)
    num_train: int = positive(20_000)
    seed: int = 0


@dataclass
class ToyModel:
    """MLP width and depth."""

    hidden: int = positive(128)
    layers: int = positive(3)
    fourier: int = positive(16)


def toy_mixture(cfg: ToyData) -> GaussianMixture:
    """Equal-weight Gaussians on a ring."""
    k = cfg.components
    angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = cfg.radius * torch.stack([angles.cos(), angles.sin()], -1)
    return GaussianMixture(torch.full((k,), 1.0 / k, dtype=torch.float64), means, torch.full((k,), cfg.std, dtype=torch.float64))


class ToyMLP(nn.Module):
    """Residual MLP backbone ``forward(x_in, c_noise, cond)`` with a null label for CFG."""

    def __init__(self, num_classes: int, hidden: int = 128, layers: int = 3, fourier: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("freqs", torch.randn(fourier, generator=torch.Generator().manual_seed(0)) * 4.0)
        self.inp = nn.Linear(2, hidden)
        self.emb = nn.Sequential(nn.Linear(2 * fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes + 1, hidden)  # index num_classes = unconditional
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(layers)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2))

    def forward(self, x: Tensor, c_noise: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        f = c_noise[:, None] * self.freqs[None] * 2 * math.pi
        e = self.emb(torch.cat([f.sin(), f.cos()], -1))
        label = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        if cond is not None and "label" in cond:
            label = cond["label"].long()
            if UNCOND in cond:
                label = torch.where(cond[UNCOND], torch.full_like(label, self.num_classes), label)
        h = self.inp(x) + e + self.label(label)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


ToyConfig = RunConfig[ToyData, ToyModel]  # the typed run config every method below receives


class ToyDomain(Domain[ToyData, ToyModel]):
    """Class-conditional 2-D Gaussian mixtures (the reference implementation of the Domain protocol).

    The contract, in the order the core calls it (``multidiff.pipeline``):

    1. ``resolve(cfg) -> cfg`` once before training / sampling: pure, returns the config the checkpoint embeds;
    2. ``build_dataset(cfg, split)``, ``collate_fn(cfg)``, ``build_backbone(cfg)``;
    3. per training batch ``unpack`` (x0, cond, backbone kwargs) and ``space``;
    4. to sample: ``request`` -> the core's sampler -> ``decode`` (-> ``merge`` of chunks) -> ``write`` -> ``evaluate``.
    """

    name = "toy"
    description = "class-conditional 2-D Gaussian mixture on a ring (example domain)"
    DataConfig = ToyData
    ModelConfig = ToyModel
    output_patterns = ("samples.csv", "samples.png")

    def resolve(self, cfg: ToyConfig) -> ToyConfig:
        """Validated ``cfg``. The toy mixture is defined by the config itself, so nothing is derived from the data
        (a domain that needs, e.g., class names or dataset statistics at sampling returns
        ``dataclasses.replace(cfg, data=replace(cfg.data, ...))`` here, leaving ``cfg`` as it was)."""
        if cfg.data.components < 1:
            raise ValueError(f"data.components: expected >= 1 mixture components, got {cfg.data.components}")
        return cfg

    def build_dataset(self, cfg: ToyConfig, split: str = "train") -> Dataset:
        gm = toy_mixture(cfg.data)
        seed = cfg.data.seed + {"train": 0, "valid": 1, "test": 2}.get(split, 3)
        x, comp = gm.sample(cfg.data.num_train, torch.Generator().manual_seed(seed))
        return TensorDataset(x.float(), comp)

    def collate_fn(self, cfg: ToyConfig) -> Callable[[list[Any]], Any]:
        """(x, label) tuples -> ([B, 2], [B]); a domain whose batches need settings of the config (a feature
        scale, normalisation statistics) captures them here from ``cfg``, not from an earlier call."""
        return default_collate

    def build_backbone(self, cfg: ToyConfig) -> nn.Module:
        return ToyMLP(cfg.data.components, cfg.model.hidden, cfg.model.layers, cfg.model.fourier)

    def unpack(self, batch: Any) -> tuple[Tensor, dict[str, Tensor] | None, dict[str, Any]]:
        x, label = batch
        return x, {"label": label}, {}

    def space(self, batch: Any) -> Space:
        return Euclidean()

    def request(self, cfg: ToyConfig, num: int, conditions: dict[str, str], inpaint: Path | None = None,
                mask: str | None = None, seed: int = 0) -> SampleRequest:
        unknown = set(conditions) - {"label"}
        if unknown:
            raise ValueError(f"toy: unknown condition(s) {sorted(unknown)}; the toy domain takes label=0..{cfg.data.components - 1}")
        if inpaint is not None:
            raise ValueError("toy: inpainting is not supported by the toy domain")
        if "label" in conditions:
            try:
                label = int(conditions["label"])
            except ValueError:
                raise ValueError(f"toy: label must be an integer, got {conditions['label']!r}") from None
            if not 0 <= label < cfg.data.components:
                raise ValueError(f"toy: label {label} out of range 0..{cfg.data.components - 1}")
            labels = torch.full((num,), label, dtype=torch.long)
        else:  # labels drawn uniformly, so that unconditioned-by-the-user samples still come with a label
            labels = torch.randint(cfg.data.components, (num,), generator=torch.Generator().manual_seed(seed))
        return SampleRequest(like=torch.zeros(num, 2), space=Euclidean(), cond={"label": labels}, meta={"labels": labels})

    def decode(self, x: Tensor, request: SampleRequest) -> dict[str, Tensor]:
        return {"x": x.detach().cpu(), "label": request.meta["labels"]}

    def merge(self, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {key: torch.cat([p[key] for p in parts]) for key in ("x", "label")}

    def write(self, samples: dict[str, Tensor], out_dir: Path, *, figures: bool = True) -> list[Path]:
        from .demo import save_scatter

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "samples.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["x", "y", "label"])
            for (a, b), lab in zip(samples["x"].tolist(), samples["label"].tolist()):
                w.writerow([f"{a:.6f}", f"{b:.6f}", lab])
        if not figures:
            return [path]
        png = out_dir / "samples.png"
        ref, _ = toy_mixture(ToyData()).sample(2000, torch.Generator().manual_seed(0))
        save_scatter(samples["x"], ref, f"toy samples (n={samples['x'].shape[0]})", png)
        return [path, png]

    def read(self, path: Path) -> dict[str, Tensor]:
        """Read samples written by ``write`` (the CSV, or the directory holding it)."""
        path = path / "samples.csv" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no samples file (expected samples.csv written by `multidiff sample toy`)")
        xs, labels = [], []
        with path.open() as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != ["x", "y", "label"]:
                raise ValueError(f"{path}: expected the header x,y,label, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                try:
                    xs.append([float(row["x"]), float(row["y"])])
                    labels.append(int(row["label"]))
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{line}: expected numbers x,y and an integer label, got {row}") from None
        if not xs:
            raise ValueError(f"{path}: no samples")
        return {"x": torch.tensor(xs, dtype=torch.float64), "label": torch.tensor(labels)}

    def metrics(self, samples: dict[str, Tensor], cfg: ToyData | None = None) -> dict[str, float]:
        """Sliced W2 to fresh data and conditional accuracy."""
        gm = toy_mixture(cfg or ToyData())
        x = samples["x"].to(torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("toy: samples contain NaN or inf")
        ref, _ = gm.sample(x.shape[0], torch.Generator().manual_seed(123))
        nearest = ((x[:, None] - gm.means[None]) ** 2).sum(-1).argmin(1)
        return {
            "sliced_wasserstein": sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0)),
            "conditional_accuracy": float((nearest == samples["label"]).float().mean()),
            "num_samples": float(x.shape[0]),
        }

    def evaluate(self, path: Path, cfg: ToyConfig | None = None) -> dict[str, float]:
        return self.metrics(self.read(path), cfg.data if cfg is not None else None)
