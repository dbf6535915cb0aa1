"""Spaces: zero-CoM noise statistics, projections, masks, products, per-sample reductions."""

from __future__ import annotations

import pytest
import torch

from multidiff.analytic import centering_projector
from multidiff.spaces import Euclidean, Graph, Masked, Product, ZeroCoM


def test_zero_com_noise_mean_and_variance_in_subspace() -> None:
    sizes = torch.tensor([3, 5, 9, 2])
    batch = torch.arange(4).repeat_interleave(sizes)
    space = ZeroCoM(batch)
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(int(sizes.sum()), 3, dtype=torch.float64)
    draws = torch.stack([space.randn_like(like, g) for _ in range(4000)])  # [S, N, 3]
    # zero mean per graph, exactly, for every draw
    com = torch.stack([space.centre_of_mass(d) for d in draws[:50]])
    assert com.abs().max() < 1e-12
    # E ||eps_graph||^2 = (n - 1) * 3, the dimension of the subspace
    sq = torch.stack([space.sum_per_sample(d**2) for d in draws])  # [S, 4]
    expected = ((sizes - 1) * 3).to(torch.float64)
    assert torch.allclose(space.dof(like), expected)
    se = (2 * expected / draws.shape[0]).sqrt()  # chi-square variance 2k
    assert ((sq.mean(0) - expected).abs() < 5 * se).all()
    # isotropic inside the subspace: covariance of one graph's flattened noise is the centering projector
    first = draws[:, :3].reshape(draws.shape[0], 9)
    cov = first.T @ first / draws.shape[0]
    assert torch.allclose(cov, centering_projector(3), atol=0.08)


def test_zero_com_projection_is_idempotent_and_orthogonal() -> None:
    batch = torch.tensor([0, 0, 0, 1, 1])
    space = ZeroCoM(batch)
    x = torch.randn(5, 3, dtype=torch.float64)
    p = space.project(x)
    assert torch.allclose(space.project(p), p)
    assert abs(float(((x - p) * p).sum())) < 1e-12  # the removed part is orthogonal to the subspace


def test_graph_space_reductions_are_per_graph() -> None:
    batch = torch.tensor([0, 0, 1, 1, 1])
    space = Graph(batch)
    x = torch.tensor([[1.0], [3.0], [2.0], [2.0], [5.0]])
    assert torch.equal(space.mean_per_sample(x), torch.tensor([2.0, 3.0]))
    assert space.num_samples == 2


def test_masked_space_keeps_padding_zero_and_counts_real_entries() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True]])
    space = Masked(mask, zero_com=True)
    x = space.randn_like(torch.zeros(2, 3, 3), torch.Generator().manual_seed(0))
    assert torch.equal(x[0, 2], torch.zeros(3))
    assert torch.allclose(x[0, :2].sum(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(x[1].sum(0), torch.zeros(3), atol=1e-6)
    assert torch.equal(space.dof(x), torch.tensor([3.0, 6.0]))
    assert torch.equal(space.count_per_sample(x), torch.tensor([6.0, 9.0]))


def test_product_space_positions_times_features() -> None:
    batch = torch.tensor([0, 0, 0, 1, 1])
    space = Product([(slice(0, 3), ZeroCoM(batch)), (slice(3, 8), Graph(batch))])
    x = space.randn_like(torch.zeros(5, 8), torch.Generator().manual_seed(1))
    assert torch.allclose(ZeroCoM(batch).centre_of_mass(x[:, :3]), torch.zeros(2, 3), atol=1e-6)
    assert not torch.allclose(Graph(batch)._segment_sum(x[:, 3:]), torch.zeros(2, 5))  # features unconstrained
    assert torch.equal(space.dof(x), torch.tensor([2 * 3 + 3 * 5, 1 * 3 + 2 * 5], dtype=torch.float32))
    with pytest.raises(ValueError, match="cover 7 of the 8"):
        Product([(slice(0, 3), ZeroCoM(batch)), (slice(3, 7), Graph(batch))]).check(torch.zeros(5, 8))


def test_euclidean_is_identity_with_batch_means() -> None:
    x = torch.arange(12.0).reshape(2, 2, 3)
    e = Euclidean()
    assert torch.equal(e.project(x), x)
    assert torch.equal(e.mean_per_sample(x), torch.tensor([2.5, 8.5]))


def test_bad_space_inputs() -> None:
    with pytest.raises(ValueError, match="batch: expected a 1-D integer graph index"):
        Graph(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="mask: expected a \\[B, N\\] bool"):
        Masked(torch.ones(3))
    with pytest.raises(ValueError, match="expected leading shape"):
        Masked(torch.ones(2, 3, dtype=torch.bool)).project(torch.zeros(2, 4, 3))
