"""Molecules on the new objectives: equivariant OT coupling (Hungarian + Kabsch), the EGNN's coordinate output for
x0-prediction and its self-conditioning input (float64 equivariance)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from domains.molecules.coupling import equivariant_ot, kabsch_rotation, transport_cost
from domains.molecules.domain import MolSpace
from domains.molecules.egnn import remove_mean
from tests.molecules.test_egnn import make_batch, make_denoiser, permutation_within_graphs, random_orthogonal_with_reflection

SIZES = [5, 9, 3, 12, 7]


def _molecules(seed: int, sizes: list[int] = SIZES) -> tuple[torch.Tensor, torch.Tensor, MolSpace]:
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x0 = torch.cat([1.5 * torch.randn(len(batch), 3, generator=g, dtype=torch.float64),
                    torch.randn(len(batch), 6, generator=g, dtype=torch.float64)], -1)
    space = MolSpace(batch, len(sizes))
    return space.project(x0), space.randn_like(x0.clone(), g), space


def test_kabsch_recovers_a_known_rotation() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(8, 3))
    pts -= pts.mean(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # proper rotation
    assert np.allclose(kabsch_rotation(pts, pts @ q.T), q, atol=1e-10)


def test_ot_noise_is_a_permuted_rotated_copy_with_zero_com_and_lower_cost() -> None:
    x0, noise, space = _molecules(0)
    batch = space.positions.batch
    aligned = equivariant_ot(x0, noise, space)
    assert torch.allclose(space.project(aligned), aligned, atol=1e-12)  # positions keep zero CoM
    before, after = transport_cost(x0, noise, batch), transport_cost(x0, aligned, batch)
    assert (after <= before + 1e-12).all() and after.mean() < 0.8 * before.mean()
    for k in range(len(SIZES)):
        rows = batch == k
        z, a = noise[rows], aligned[rows]
        # same multiset of atom noise rows up to one rotation of the positions: norms and features per row agree
        key = lambda v: sorted(zip(v[:, :3].norm(dim=-1).round(decimals=9).tolist(), v[:, 3].tolist()))  # noqa: E731
        assert key(z) == key(a)
        gram_z, gram_a = z[:, :3] @ z[:, :3].T, a[:, :3] @ a[:, :3].T
        perm = [int((z[:, 3] == v).nonzero()) for v in a[:, 3]]
        assert torch.allclose(gram_a, gram_z[perm][:, perm], atol=1e-10)  # rigid motion: the Gram matrix is kept


def test_hungarian_step_is_the_best_permutation() -> None:
    """On a 4-atom molecule the assignment minimises the position cost over all 24 permutations (before rotation)."""
    x0, noise, space = _molecules(1, [4])
    aligned = equivariant_ot(x0, noise, space)
    perm = [int((noise[:, 3] == v).nonzero()) for v in aligned[:, 3]]
    cost = lambda p: float(((x0[:, :3] - noise[list(p), :3]) ** 2).sum())  # noqa: E731
    assert cost(perm) == pytest.approx(min(cost(p) for p in itertools.permutations(range(4))))


def test_ot_noise_keeps_the_noise_distribution() -> None:
    """Rotation/permutation-invariant statistics of the aligned noise follow the isotropic zero-CoM Gaussian:
    each molecule's squared noise norm is chi^2 with 3(n-1) (positions) degrees of freedom."""
    norms, dof = [], []
    for seed in range(60):
        x0, noise, space = _molecules(100 + seed)
        aligned = equivariant_ot(x0, noise, space)
        batch = space.positions.batch
        sq = torch.zeros(len(SIZES), dtype=torch.float64).index_add_(0, batch, aligned[:, :3].pow(2).sum(-1))
        norms += sq.tolist()
        dof += [3 * (n - 1) for n in SIZES]
    u = [stats.chi2.cdf(v, d) for v, d in zip(norms, dof)]
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_ot_rejects_a_single_atom_molecule() -> None:
    x0, noise, space = _molecules(2, [3, 1, 4])
    with pytest.raises(ValueError, match="one atom"):
        equivariant_ot(x0, noise, space)


@pytest.mark.parametrize("kw", [{"position_output": "coordinates"}, {"self_conditioning": True},
                                {"position_output": "coordinates", "self_conditioning": True}],
                         ids=["coordinates", "self_cond", "both"])
def test_new_egnn_options_are_e3_equivariant(kw: dict) -> None:
    torch.manual_seed(0)
    model = make_denoiser(**kw)
    sizes = [4, 7, 5]
    x, batch = make_batch(sizes)
    noise = torch.randn(len(sizes), dtype=torch.float64)
    sc = make_batch(sizes)[0] if kw.get("self_conditioning") else None
    out = model(x, noise, None, batch=batch, self_cond=sc)
    assert torch.allclose(remove_mean(out[:, :3], batch, len(sizes)), out[:, :3], atol=1e-12)

    q, shift, perm = random_orthogonal_with_reflection(), torch.randn(1, 3, dtype=torch.float64), permutation_within_graphs(batch)
    move = lambda v: torch.cat([v[:, :3] @ q.T + shift, v[:, 3:]], -1)[perm]  # noqa: E731
    out2 = model(move(x), noise, None, batch=batch, self_cond=None if sc is None else move(sc))
    assert torch.allclose(out2[:, :3], (out[:, :3] @ q.T)[perm], atol=1e-10)
    assert torch.allclose(out2[:, 3:], out[:, 3:][perm], atol=1e-10)
    if sc is not None:  # the self-conditioning input is used
        assert not torch.allclose(model(x, noise, None, batch=batch, self_cond=None), out)


def test_coordinate_output_is_the_moved_input() -> None:
    torch.manual_seed(0)
    x, batch = make_batch([4, 6])
    noise = torch.randn(2, dtype=torch.float64)
    disp = make_denoiser()
    coords = make_denoiser(position_output="coordinates")
    coords.load_state_dict(disp.state_dict())
    assert torch.allclose(coords(x, noise, batch=batch)[:, :3], disp(x, noise, batch=batch)[:, :3] + x[:, :3], atol=1e-12)
