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


# --- categorical atom types and the new objectives in the domain ----------------------------------------------------

from pathlib import Path  # noqa: E402

from multidiff import pipeline  # noqa: E402
from multidiff.registry import get_domain, run_config_class  # noqa: E402

from domains.molecules.constants import ELEMENTS  # noqa: E402
from domains.molecules.domain import MolData, MolModel  # noqa: E402

METHANOL = [("C", 1.0, 2.0, 3.0), ("O", 2.42, 2.0, 3.0), ("H", 0.64, 2.0, 4.02), ("H", 0.64, 2.88, 2.49),
            ("H", 0.64, 1.12, 2.49), ("H", 2.74, 2.0, 3.9)]


def tiny(categorical: bool = True, target: str = "x0", schedule: str = "flow", **data: object) -> pipeline.LoadedModel:
    """A random-weight 2 x 16 EGNN with hand-set stats (no QM9 needed)."""
    dom = get_domain("molecules")
    cfg = run_config_class(dom)()
    cfg.data = MolData(n_atoms_counts=[0] * 9 + [1, 2, 3, 2, 1], atom_types="categorical" if categorical else "continuous",
                       include_charges=not categorical, **data)  # type: ignore[arg-type]
    cfg.model = MolModel(hidden=16, layers=2)
    cfg.diffusion.schedule, cfg.diffusion.schedule_args, cfg.diffusion.target = schedule, {}, target
    torch.manual_seed(0)
    return pipeline.LoadedModel(dom, cfg, pipeline.build_denoiser(dom, cfg).eval().requires_grad_(False), None, Path("tiny"))


@pytest.mark.parametrize("sampler", ["euler", "ancestral", "heun"])
def test_categorical_model_samples_one_hot_atom_types(sampler: str) -> None:
    model = tiny()
    req = model.domain.request(model.cfg, 5, {}, seed=1)
    x = pipeline.generate(model, req, sampler=sampler, steps=6, generator=torch.Generator().manual_seed(0))
    types = x[:, 3:]
    assert types.shape[1] == len(ELEMENTS) and set(types.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(types.sum(-1), torch.ones(len(x)))
    mols = model.domain.decode(x, req).molecules
    assert [len(m.elements) for m in mols] == req.meta["sizes"].tolist()


def test_fragment_completion_on_flow_x0_categorical_keeps_the_fragment(tmp_path: Path) -> None:
    model = tiny()
    frag = tmp_path / "methanol.xyz"
    frag.write_text(f"{len(METHANOL)}\nfragment\n" + "".join(f"{s} {x} {y} {z}\n" for s, x, y, z in METHANOL))
    req = model.domain.request(model.cfg, 3, {}, inpaint=frag, seed=2)
    x = pipeline.generate(model, req, sampler="euler", steps=6, generator=torch.Generator().manual_seed(0))
    anchor = req.mask[:, 0]
    assert torch.equal(x[anchor], req.known[anchor])
    for mol in model.domain.decode(x, req).molecules:
        assert mol.elements[: len(METHANOL)] == tuple(a[0] for a in METHANOL)
        assert np.allclose(mol.positions[: len(METHANOL)], [a[1:] for a in METHANOL], atol=1e-5)


def test_predictor_guidance_reads_a_categorical_estimate_as_edm_rows() -> None:
    """For a one-hot estimate the predictor sees exactly the rows a continuous (EDM-featured) model would give it."""
    shipped = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "molecules_alpha_predictor.safetensors"
    cat, cont = tiny(predictor=str(shipped)), tiny(categorical=False, target="eps", predictor=str(shipped))
    req_cat = cat.domain.request(cat.cfg, 2, {"alpha": "70", "n": "9"})
    req_cont = cont.domain.request(cont.cfg, 2, {"alpha": "70", "n": "9"})
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(18, 3, generator=g)
    z = torch.tensor([6, 6, 8, 1, 1, 1, 1, 1, 1] * 2)
    from domains.molecules.features import atom_rows

    t = torch.tensor(0.3)
    lp_cat = cat.domain.guidance_log_prob(cat.cfg, req_cat)(atom_rows(pos, z, False, 1.0), t)
    lp_cont = cont.domain.guidance_log_prob(cont.cfg, req_cont)(atom_rows(pos, z, True), t)
    assert torch.allclose(lp_cat, lp_cont, atol=1e-5)


def test_objective_recipe_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="include_charges=false"):
        dom = get_domain("molecules")
        cfg = run_config_class(dom)()
        cfg.data = MolData(n_atoms_counts=[0, 0, 1], atom_types="categorical", include_charges=True)
        dom.request(cfg, 1, {})
    dom = get_domain("molecules")
    cfg = run_config_class(dom)()
    cfg.diffusion.coupling = "sinkhorn"
    with pytest.raises(ValueError, match="diffusion.coupling='sinkhorn'.*equivariant_ot"):
        dom.coupling(cfg)
    toy = get_domain("toy")
    tcfg = run_config_class(toy)()
    tcfg.diffusion.coupling = "equivariant_ot"
    with pytest.raises(ValueError, match="defines no coupling"):
        toy.coupling(tcfg)


def test_a_distilled_self_conditioned_molecules_model_loads_and_samples_without_feeding_back(tmp_path: Path) -> None:
    """A self-conditioned EGNN (wider inputs) distilled to 2 steps: the student keeps the teacher's network shape, so
    ``load_model`` reads it back, and it samples with no previous estimate fed back, as it was trained; the teacher
    itself (and any self-conditioned model) gets the previous estimate from its second network evaluation on."""
    from multidiff.distill import distill

    teacher = tiny()
    teacher.cfg.diffusion.self_condition = 0.5
    torch.manual_seed(0)
    teacher.denoiser = pipeline.build_denoiser(teacher.domain, teacher.cfg).eval().requires_grad_(False)
    teacher.cfg.train.batch_size = 8
    distill(teacher, 2, tmp_path / "student", rounds=1, iters=2)
    student = pipeline.load_model(tmp_path / "student")  # the wider self-conditioning input is still there
    assert student.cfg.diffusion.self_condition == 0.5 and student.cfg.sample.self_condition is False

    def fed_back(model: pipeline.LoadedModel) -> list[bool]:
        seen: list[bool] = []
        hook = model.denoiser.backbone.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs.get("self_cond") is not None), with_kwargs=True)
        req = model.domain.request(model.cfg, 3, {}, seed=1)
        pipeline.generate(model, req, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(0))
        hook.remove()
        return seen

    assert fed_back(student) == [False, False, False]
    assert fed_back(teacher) == [False, True, True]
