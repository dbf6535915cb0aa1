"""Where noise lives: samplers and losses draw noise, project and average only through a ``Space``.

- ``Euclidean``: a batch [B, ...]; each sample is one element of the batch.
- ``Graph``: node rows [N, D] grouped into B graphs by a PyG-style ``batch`` index.
- ``ZeroCoM``: like ``Graph`` (or padded [B, N, D] with a node mask) but restricted to the
  subspace where each graph's centre of mass is zero (Satorras et al. 2021; Hoogeboom et al. 2022).
- ``Masked``: a padded batch [B, N, ...] where only ``mask`` entries exist.
- ``Product``: slices of the last dimension that live in different spaces (positions x features).
- ``Categorical``: one-hot rows of K classes, a discrete part of the state (atom types, tokens): its "noise" is a
  uniformly random class, its interpolation a corruption (see ``multidiff.categorical``), not a Gaussian.

``randn_like(x, generator)`` takes one ``torch.Generator`` for the whole batch, or a sequence of them, one per
sample: then sample i's noise comes from ``generator[i]`` alone, so it does not depend on its batch-mates
(``Euclidean``, ``Graph``/``ZeroCoM``, ``Masked`` and ``Product`` of these).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["Space", "Euclidean", "Graph", "ZeroCoM", "Masked", "Product", "Categorical", "Generators"]

# one generator for the batch, one per sample, or None (the global RNG)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def _per_sample(generator: Generators) -> bool:
    return isinstance(generator, (list, tuple))


class Space(ABC):
    """A linear subspace of tensors of one shape, with per-sample reductions."""

    @property
    @abstractmethod
    def num_samples(self) -> int | None:
        """B, the number of independent samples (None if any leading size is allowed)."""

    @abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """Orthogonal projection onto the space."""

    @abstractmethod
    def sum_per_sample(self, x: Tensor) -> Tensor:
        """Sum of the elements of each sample that belong to the space: [B]."""

    @abstractmethod
    def count_per_sample(self, x: Tensor) -> Tensor:
        """Number of entries of each sample counted by ``sum_per_sample``: [B]."""

    @abstractmethod
    def dof(self, x: Tensor) -> Tensor:
        """Degrees of freedom (dimension of the subspace) per sample: [B]."""

    def check(self, x: Tensor, name: str = "x") -> None:
        """Raise ValueError when ``x`` cannot live in this space."""

    def randn_like(self, x: Tensor, generator: Generators = None) -> Tensor:
        """Standard normal noise in the space (an isotropic Gaussian on the subspace); see ``Generators``."""
        self.check(x)
        if _per_sample(generator):
            noise = self._randn_per_sample(x, list(generator))  # type: ignore[arg-type]
        else:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.project(noise)

    def _randn_per_sample(self, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        """Unprojected noise shaped like ``x`` whose entries of sample i are drawn from ``generators[i]`` only."""
        raise NotImplementedError(f"{type(self).__name__}: per-sample noise generators are not supported")

    def _check_generators(self, generators: list[torch.Generator], num: int) -> None:
        if len(generators) != num:
            raise ValueError(f"generator: expected one generator per sample ({num}), got {len(generators)}")

    def mean_per_sample(self, x: Tensor) -> Tensor:
        """Mean over each sample's entries: [B]."""
        return self.sum_per_sample(x) / self.count_per_sample(x)

    def discrete_parts(self) -> list[tuple[slice, "Categorical"]]:
        """The categorical parts of the state as (column slice, space); [] for a purely continuous space."""
        return []

    def continuous_mean_per_sample(self, x: Tensor) -> Tensor:
        """Mean over each sample's continuous entries: [B] (all entries when there is no categorical part, zeros
        when there is no continuous one)."""
        return self.mean_per_sample(x)


class Euclidean(Space):
    """All of R^{B x ...}: identity projection, per-sample means over every non-batch dimension."""

    @property
    def num_samples(self) -> int | None:
        return None

    def project(self, x: Tensor) -> Tensor:
        return x

    def _randn_per_sample(self, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        self._check_generators(generators, x.shape[0])
        if not generators:
            return torch.empty_like(x)
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generators])

    def check(self, x: Tensor, name: str = "x") -> None:
        if x.ndim < 1:
            raise ValueError(f"{name}: expected a batch with a leading sample dimension, got a scalar")

    def sum_per_sample(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).sum(1)

    def count_per_sample(self, x: Tensor) -> Tensor:
        n = x[0].numel() if x.shape[0] else 0
        return torch.full((x.shape[0],), n, dtype=x.dtype, device=x.device)

    def dof(self, x: Tensor) -> Tensor:
        return self.count_per_sample(x)

    def __repr__(self) -> str:
        return "Euclidean()"


def _check_batch(batch: Tensor) -> None:
    if batch.ndim != 1 or batch.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"batch: expected a 1-D integer graph index, got shape {tuple(batch.shape)} {batch.dtype}")


class Graph(Space):
    """Node rows x [N, D] of B graphs given by ``batch`` [N] (PyG ``Batch.batch``); no constraint."""

    def __init__(self, batch: Tensor, num_graphs: int | None = None) -> None:
        _check_batch(batch)
        self.batch = batch.long()
        self._num_graphs = int(num_graphs if num_graphs is not None else (int(batch.max()) + 1 if batch.numel() else 0))
        self.nodes = torch.bincount(self.batch, minlength=self._num_graphs)

    @property
    def num_samples(self) -> int:
        return self._num_graphs

    def check(self, x: Tensor, name: str = "x") -> None:
        if x.ndim != 2 or x.shape[0] != self.batch.shape[0]:
            raise ValueError(
                f"{name}: expected node rows of shape [N={self.batch.shape[0]}, D], got {tuple(x.shape)}"
            )

    def project(self, x: Tensor) -> Tensor:
        return x

    def _randn_per_sample(self, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        self._check_generators(generators, self._num_graphs)
        noise = torch.empty_like(x)
        batch = self.batch.to(x.device)
        for i, g in enumerate(generators):
            rows = torch.nonzero(batch == i).squeeze(-1)
            noise[rows] = torch.randn((rows.numel(),) + x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
        return noise

    def _segment_sum(self, x: Tensor) -> Tensor:
        out = torch.zeros((self._num_graphs,) + x.shape[1:], dtype=x.dtype, device=x.device)
        return out.index_add_(0, self.batch.to(x.device), x)

    def sum_per_sample(self, x: Tensor) -> Tensor:
        return self._segment_sum(x).reshape(self._num_graphs, -1).sum(1)

    def count_per_sample(self, x: Tensor) -> Tensor:
        return (self.nodes.to(x.device) * x[0].numel()).to(x.dtype)

    def dof(self, x: Tensor) -> Tensor:
        return self.count_per_sample(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_graphs={self._num_graphs}, nodes={self.batch.shape[0]})"


class ZeroCoM(Graph):
    """Node positions with zero centre of mass per graph: the (n-1)*D dimensional subspace of R^{n x D}."""

    def project(self, x: Tensor) -> Tensor:
        self.check(x)
        nodes = self.nodes.to(x.device).clamp_min(1).to(x.dtype)
        mean = self._segment_sum(x) / nodes.unsqueeze(-1)
        return x - mean[self.batch.to(x.device)]

    def dof(self, x: Tensor) -> Tensor:
        return ((self.nodes.to(x.device) - 1).clamp_min(0) * x.shape[1]).to(x.dtype)

    def centre_of_mass(self, x: Tensor) -> Tensor:
        """Per-graph mean position [B, D]."""
        nodes = self.nodes.to(x.device).clamp_min(1).to(x.dtype)
        return self._segment_sum(x) / nodes.unsqueeze(-1)


class Masked(Space):
    """A padded batch x [B, N, ...] where ``mask`` [B, N] marks the entries that exist; padding stays zero."""

    def __init__(self, mask: Tensor, zero_com: bool = False) -> None:
        if mask.ndim != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a [B, N] bool tensor, got shape {tuple(mask.shape)} {mask.dtype}")
        self.mask = mask
        self.zero_com = zero_com

    @property
    def num_samples(self) -> int:
        return self.mask.shape[0]

    def check(self, x: Tensor, name: str = "x") -> None:
        if tuple(x.shape[:2]) != tuple(self.mask.shape):
            raise ValueError(f"{name}: expected leading shape {tuple(self.mask.shape)} (the mask), got {tuple(x.shape)}")

    def _m(self, x: Tensor) -> Tensor:
        return self.mask.to(x.device).reshape(self.mask.shape + (1,) * (x.ndim - 2)).to(x.dtype)

    def project(self, x: Tensor) -> Tensor:
        self.check(x)
        m = self._m(x)
        x = x * m
        if self.zero_com:
            n = m.sum(1, keepdim=True).clamp_min(1)
            x = (x - x.sum(1, keepdim=True) / n) * m
        return x

    def _randn_per_sample(self, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        self._check_generators(generators, self.mask.shape[0])
        noise = torch.zeros_like(x)  # padding gets no draws, so a sample's noise ignores the padded length
        mask = self.mask.to(x.device)
        for i, g in enumerate(generators):
            n = int(mask[i].sum())
            noise[i][mask[i]] = torch.randn((n,) + x.shape[2:], generator=g, dtype=x.dtype, device=x.device)
        return noise

    def sum_per_sample(self, x: Tensor) -> Tensor:
        return (x * self._m(x)).reshape(x.shape[0], -1).sum(1)

    def count_per_sample(self, x: Tensor) -> Tensor:
        per_node = x[0, 0].numel() if x.shape[1] else 0
        return self.mask.to(x.device).sum(1).to(x.dtype) * per_node

    def dof(self, x: Tensor) -> Tensor:
        per_node = x[0, 0].numel() if x.shape[1] else 0
        n = self.mask.to(x.device).sum(1)
        if self.zero_com:
            n = (n - 1).clamp_min(0)
        return (n * per_node).to(x.dtype)

    def __repr__(self) -> str:
        return f"Masked(shape={tuple(self.mask.shape)}, zero_com={self.zero_com})"


class Product(Space):
    """Slices of the last dimension living in different spaces, e.g. positions (ZeroCoM) x atom features (Graph)."""

    def __init__(self, parts: Sequence[tuple[slice, Space]]) -> None:
        if not parts:
            raise ValueError("Product: needs at least one (slice, space) part")
        self.parts = list(parts)

    @property
    def num_samples(self) -> int | None:
        return self.parts[0][1].num_samples

    @property
    def batch(self) -> Tensor | None:
        """The graph index shared by the parts (None for non-graph parts), used to map per-sample values to rows."""
        return getattr(self.parts[0][1], "batch", None)

    def check(self, x: Tensor, name: str = "x") -> None:
        covered = sum(len(range(*sl.indices(x.shape[-1]))) for sl, _ in self.parts)
        if covered != x.shape[-1]:
            raise ValueError(f"{name}: Product slices cover {covered} of the {x.shape[-1]} entries of the last dimension")
        for sl, space in self.parts:
            space.check(x[..., sl], name)

    def _map(self, x: Tensor, fn_name: str) -> Tensor:
        return torch.cat([getattr(space, fn_name)(x[..., sl]) for sl, space in self.parts], dim=-1)

    def project(self, x: Tensor) -> Tensor:
        return self._map(x, "project")

    def randn_like(self, x: Tensor, generator: Generators = None) -> Tensor:
        self.check(x)
        return torch.cat([space.randn_like(x[..., sl], generator) for sl, space in self.parts], dim=-1)

    def _total(self, x: Tensor, fn_name: str) -> Tensor:
        return sum(getattr(space, fn_name)(x[..., sl]) for sl, space in self.parts)  # type: ignore[return-value]

    def sum_per_sample(self, x: Tensor) -> Tensor:
        return self._total(x, "sum_per_sample")

    def count_per_sample(self, x: Tensor) -> Tensor:
        return self._total(x, "count_per_sample")

    def dof(self, x: Tensor) -> Tensor:
        return self._total(x, "dof")

    def discrete_parts(self) -> list[tuple[slice, "Categorical"]]:
        return [(sl, space) for sl, space in self.parts if isinstance(space, Categorical)]

    def continuous_mean_per_sample(self, x: Tensor) -> Tensor:
        parts = [(sl, space) for sl, space in self.parts if not isinstance(space, Categorical)]
        if not parts:
            return torch.zeros_like(self.mean_per_sample(x))
        total = sum(space.sum_per_sample(x[..., sl]) for sl, space in parts)
        return total / sum(space.count_per_sample(x[..., sl]) for sl, space in parts)  # type: ignore[return-value]

    def __repr__(self) -> str:
        inner = ", ".join(f"[{sl.start}:{sl.stop}] {space!r}" for sl, space in self.parts)
        return f"Product({inner})"


class Categorical(Space):
    """One-hot rows over ``classes`` categories, grouped into samples by ``base`` (e.g. a ``Graph`` of atoms).

    A discrete part of the state (Campbell et al. 2024, discrete flow models): ``randn_like`` draws a uniformly random
    class per row (the noise of the uniform-corruption interpolation), ``project`` is the identity, and the per-sample
    reductions are the base space's. ``multidiff.categorical`` holds its interpolation, loss and sampler update.
    """

    def __init__(self, classes: int, base: Space | None = None) -> None:
        if classes < 2:
            raise ValueError(f"Categorical: expected at least 2 classes, got {classes}")
        self.classes = classes
        self.base = base if base is not None else Euclidean()

    @property
    def num_samples(self) -> int | None:
        return self.base.num_samples

    @property
    def batch(self) -> Tensor | None:
        return getattr(self.base, "batch", None)

    def check(self, x: Tensor, name: str = "x") -> None:
        self.base.check(x, name)
        if x.shape[-1] != self.classes:
            raise ValueError(f"{name}: a categorical part of {self.classes} classes needs {self.classes} one-hot "
                             f"columns, got {x.shape[-1]}")

    def project(self, x: Tensor) -> Tensor:
        return x

    def randn_like(self, x: Tensor, generator: Generators = None) -> Tensor:
        self.check(x)
        rows = x.shape[:-1]
        if _per_sample(generator):
            batch = self.batch
            if batch is None:
                self._check_generators(list(generator), rows[0])  # type: ignore[arg-type]
                idx = torch.stack([torch.randint(self.classes, rows[1:], generator=g) for g in generator])  # type: ignore[union-attr]
            else:
                self._check_generators(list(generator), int(self.num_samples or 0))  # type: ignore[arg-type]
                idx = torch.empty(rows, dtype=torch.long)
                for i, g in enumerate(generator):  # type: ignore[arg-type]
                    sel = torch.nonzero(batch == i).squeeze(-1)
                    idx[sel] = torch.randint(self.classes, (sel.numel(),), generator=g)
        else:
            idx = torch.randint(self.classes, rows, generator=generator)
        return torch.nn.functional.one_hot(idx.to(x.device), self.classes).to(x.dtype)

    def sum_per_sample(self, x: Tensor) -> Tensor:
        return self.base.sum_per_sample(x)

    def count_per_sample(self, x: Tensor) -> Tensor:
        return self.base.count_per_sample(x)

    def dof(self, x: Tensor) -> Tensor:
        return self.base.count_per_sample(x[..., :1])  # one categorical choice per row

    def discrete_parts(self) -> list[tuple[slice, "Categorical"]]:
        return [(slice(None), self)]

    def continuous_mean_per_sample(self, x: Tensor) -> Tensor:
        return torch.zeros_like(self.mean_per_sample(x))

    def __repr__(self) -> str:
        return f"Categorical(classes={self.classes}, base={self.base!r})"
