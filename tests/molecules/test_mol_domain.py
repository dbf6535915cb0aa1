"""The molecules domain: CLI end to end, zero centre of mass, CFG at scale 1, fragment completion, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multidiff import pipeline
from multidiff.registry import get_domain, run_config_class
from multidiff.samplers import prior, sample_dpmpp_2m
from multidiff.schedules import make_grid

from domains.molecules.domain import FragmentFrame, MolData, MoleculesDomain, MolModel

ENV = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
TINY = ["train.steps=20", "data.max_molecules=512", "train.ckpt_every=20", "train.log_every=10",
        "model.hidden=32", "model.layers=2"]
# Methanol (CH3OH), Angstrom, atoms deliberately off-centre.
METHANOL = [("C", 1.0, 2.0, 3.0), ("O", 2.42, 2.0, 3.0), ("H", 0.64, 2.0, 4.02), ("H", 0.64, 2.88, 2.49),
            ("H", 0.64, 1.12, 2.49), ("H", 2.74, 2.0, 3.9)]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multidiff.cli", *args], capture_output=True, text=True, env=ENV, timeout=600)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def squash(text: str) -> str:
    """Error text without whitespace (rich wraps long lines)."""
    return "".join(text.split())


def write_xyz(path: Path, atoms: list[tuple[str, float, float, float]]) -> Path:
    path.write_text(f"{len(atoms)}\nfragment\n" + "".join(f"{s} {x} {y} {z}\n" for s, x, y, z in atoms))
    return path


def tiny_model(conditioning: list[str] = (), target: str = "eps") -> pipeline.LoadedModel:
    """A random-weight 2 x 16 EGNN with hand-set stats (no QM9 needed)."""
    dom = get_domain("molecules")
    cfg = run_config_class(dom)()
    cfg.data = MolData(conditioning=list(conditioning), n_atoms_counts=[0] * 9 + [1, 2, 3, 2, 1],
                       property_mean=[75.0] * len(conditioning), property_mad=[6.0] * len(conditioning))
    cfg.model = MolModel(hidden=16, layers=2)
    cfg.diffusion.schedule, cfg.diffusion.target = "edm_poly", target
    torch.manual_seed(0)
    den = pipeline.build_denoiser(dom, cfg).eval().requires_grad_(False)
    return pipeline.LoadedModel(dom, cfg, den, None, Path("tiny"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mol") / "run"
    res = last_json(cli("train", "molecules", "--config", "fast", *TINY, "--out", str(out), "--no-progress"))
    assert res["step"] == 20 and res["loss"] is not None
    return out


def test_cli_train_sample_evaluate(run: Path, tmp_path: Path) -> None:
    cfg = pipeline.load_model(run).cfg
    assert sum(cfg.data.n_atoms_counts) == 512  # the training histogram travels in the checkpoint
    out = tmp_path / "s"
    res = last_json(cli("sample", "molecules", "--checkpoint", str(run), "--num", "8", "--steps", "10", "--out", str(out),
                        "--no-progress"))
    for name in ("molecules.sdf", "molecules.xyz", "molecules.png", "metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert res["metrics"]["num_molecules"] == 8
    assert (out / "molecules.sdf").read_text().count("$$$$") == 8
    metrics = last_json(cli("evaluate", "molecules", str(out)))
    assert metrics["num_molecules"] == 8 and 0.0 <= metrics["atom_stability"] <= 1.0
    assert {k: metrics[k] for k in ("atom_stability", "validity")} == {k: res["metrics"][k] for k in ("atom_stability", "validity")}


def test_cli_bad_inputs_fail_clearly(run: Path, tmp_path: Path) -> None:
    p = cli("sample", "molecules", "--checkpoint", str(run), "--num", "2", "--condition", "alpha=80", "--out", str(tmp_path / "a"))
    assert p.returncode != 0 and "alpha" in p.stderr and "valid" in p.stderr and "Traceback" not in p.stderr

    bad = tmp_path / "broken.sdf"
    bad.write_text("not a molfile\n\n\nthis is garbage\n$$$$\n")
    p = cli("sample", "molecules", "--checkpoint", str(run), "--num", "2", "--inpaint", str(bad), "--out", str(tmp_path / "b"))
    assert p.returncode != 0 and squash(str(bad)) in squash(p.stderr) and "malformed" in p.stderr



def test_cli_bad_molecule_files_are_named(run: Path, tmp_path: Path) -> None:
    far = write_xyz(tmp_path / "far.xyz", [("C", 0.0, 0.0, 0.0), ("O", 1e30, 0.0, 0.0)])
    p = cli("sample", "molecules", "--checkpoint", str(run), "--num", "2", "--inpaint", str(far), "--out", str(tmp_path / "a"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert squash(f"{far}, record 1, line 4: coordinate 1e+30 A is not a molecule's") in squash(p.stderr)
    blob = tmp_path / "binary.sdf"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    p = cli("evaluate", "molecules", str(blob))
    assert p.returncode != 0 and "Traceback" not in p.stderr and "codec" not in p.stderr
    assert squash(f"{blob}: not a text SDF file") in squash(p.stderr)


def test_samples_have_zero_centre_of_mass_and_requested_size() -> None:
    model = tiny_model()
    req = model.domain.request(model.cfg, 6, {}, seed=1)
    x = pipeline.generate(model, req, sampler="dpmpp_2m", steps=6, generator=torch.Generator().manual_seed(0))
    com = torch.zeros(6, 3).index_add_(0, req.kwargs["batch"], x[:, :3]) / req.meta["sizes"].unsqueeze(-1)
    assert com.abs().max() < 1e-5
    assert set(req.meta["sizes"].tolist()) <= {9, 10, 11, 12, 13}  # drawn from the histogram's support
    fixed = model.domain.request(model.cfg, 3, {"n": "18"})
    assert fixed.meta["sizes"].tolist() == [18, 18, 18]
    samples = model.domain.decode(x, req)
    assert [len(m.elements) for m in samples.molecules] == req.meta["sizes"].tolist()


def test_cfg_scale_one_is_plain_conditional_sampling() -> None:
    model = tiny_model(["alpha"])
    req = model.domain.request(model.cfg, 4, {"alpha": "80", "n": "7"})
    assert not req.batched_cfg and torch.allclose(req.cond["properties"], torch.full((4, 1), 5 / 6))
    via_pipeline = pipeline.generate(model, req, sampler="dpmpp_2m", steps=5, guidance=1.0,
                                     generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    schedule = model.denoiser.schedule
    ts = make_grid(schedule, 5, "karras")
    x = prior(schedule, ts[0], req.like, req.space, g)
    direct = sample_dpmpp_2m(model.denoiser.bind(req.cond, space=req.space, **req.kwargs), x, ts, schedule, req.space, generator=g)
    assert torch.equal(via_pipeline, direct)
    guided = pipeline.generate(model, req, sampler="dpmpp_2m", steps=5, guidance=3.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(guided, direct)


def test_unknown_property_lists_valid_ones() -> None:
    model = tiny_model(["alpha"])
    with pytest.raises(ValueError, match=r"unknown condition.*'gapp'.*valid: \['n', 'alpha'\]"):
        model.domain.request(model.cfg, 2, {"gapp": "3"})
    with pytest.raises(ValueError, match="alpha must be a number"):
        model.domain.request(model.cfg, 2, {"alpha": "big", "n": "9"})


def test_fragment_with_unknown_element_names_the_file(tmp_path: Path) -> None:
    from domains.molecules.io import MoleculeFormatError

    model = tiny_model()
    chlorine = write_xyz(tmp_path / "chloro.xyz", [("C", 0.0, 0.0, 0.0), ("Cl", 1.78, 0.0, 0.0)])
    with pytest.raises(MoleculeFormatError, match=r"chloro\.xyz.*element Cl not in vocabulary"):
        model.domain.request(model.cfg, 2, {}, inpaint=chlorine)
    with pytest.raises(ValueError, match=r"frag\.pdb.*unknown fragment format"):
        (tmp_path / "frag.pdb").write_text("ATOM\n")
        model.domain.request(model.cfg, 2, {}, inpaint=tmp_path / "frag.pdb")


def test_eps_denoiser_is_translation_equivariant() -> None:
    """The fragment frame relies on D(x + alpha c) = D(x) + c, which holds for the eps target."""
    model = tiny_model()
    req = model.domain.request(model.cfg, 3, {"n": "9"})
    x = prior(model.denoiser.schedule, 0.5, req.like, req.space, torch.Generator().manual_seed(0))
    t = torch.tensor(0.5, dtype=torch.float64)
    alpha = float(model.denoiser.schedule.alpha(t))
    shift = torch.zeros_like(x)
    shift[:, :3] = torch.tensor([1.5, -2.0, 0.7])
    d0 = model.denoiser(x, t, None, space=req.space, **req.kwargs)
    d1 = model.denoiser(x + alpha * shift, t, None, space=req.space, **req.kwargs)
    assert torch.allclose(d1 - d0, shift, atol=1e-4)


def test_fragment_completion_keeps_the_fragment_exactly(tmp_path: Path) -> None:
    model = tiny_model()
    frag = write_xyz(tmp_path / "methanol.xyz", METHANOL)
    req = model.domain.request(model.cfg, 4, {}, inpaint=frag, seed=2)
    assert (req.meta["sizes"] > len(METHANOL)).all()
    x = pipeline.generate(model, req, sampler="dpmpp_2m", steps=6, generator=torch.Generator().manual_seed(0))
    anchor = req.mask[:, 0]
    assert torch.equal(x[anchor], req.known[anchor])  # bit-exact in the fragment frame (elements + geometry)
    given = torch.tensor([a[1:] for a in METHANOL], dtype=torch.float64)
    for mol in model.domain.decode(x, req).molecules:
        assert mol.elements[: len(METHANOL)] == tuple(a[0] for a in METHANOL)
        assert torch.allclose(torch.from_numpy(mol.positions[: len(METHANOL)]), given, atol=1e-5)  # input frame
        assert len(mol.elements) > len(METHANOL)
    # the new atoms are not pinned to the fragment's centroid (no artificial constraint from zero CoM)
    assert torch.isfinite(x).all() and x[~anchor, :3].mean(0).abs().max() > 1e-3
    # the predicted noise is re-gauged into the fragment frame (else the CoM offset is amplified by 1/alpha)
    eps = model.denoiser.backbone(x, torch.zeros(4), None, **req.kwargs)[:, :3]
    frag_mean = torch.zeros(4, 3).index_add_(0, req.kwargs["batch"][anchor], eps[anchor]) / len(METHANOL)
    assert frag_mean.abs().max() < 1e-5 and eps.mean(0).abs().max() > 1e-4


def test_fragment_frame_never_moves_centred_anchor_rows() -> None:
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    anchor = torch.tensor([True, True, False, True, False, False, False])
    space = FragmentFrame(batch, anchor)
    x = torch.randn(7, 3)
    p = space.project(x)
    assert torch.allclose(p[:2].mean(0), torch.zeros(3), atol=1e-6) and torch.allclose(p[3], torch.zeros(3), atol=1e-6)
    assert torch.allclose(p[1] - p[2], x[1] - x[2])  # geometry (differences) unchanged
    assert torch.allclose(space.project(p), p, atol=1e-6)  # idempotent: centred anchor rows are not moved


def test_predictor_recipe_trains_egnn_predictor_on_first_half() -> None:
    dom = MoleculesDomain()
    loaded = pipeline.load_run_config(dom, "property_predictor", ["data.max_molecules=64", "model.hidden=16", "model.layers=2"])
    cfg = dom.resolve(loaded)
    assert loaded.data.property_mean == [] and loaded.data.n_atoms_counts == []  # resolve is pure
    assert dom.resolve(cfg) is cfg  # resolved once: nothing left to fill
    with pytest.raises(ValueError, match=r"resolve the config first"):
        dom.collate_fn(loaded)  # normalising properties needs the resolved mean / MAD
    module = dom.training_module(cfg)
    ds = dom.build_dataset(cfg)
    assert dom._split(cfg) == "predictor" and len(ds) == 64
    assert len(cfg.data.property_mean) == 1 and cfg.data.property_mad[0] > 0
    loss = module(dom.collate_fn(cfg)([ds[i] for i in range(8)]))
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    with pytest.raises(ValueError, match="no denoiser"):
        dom.build_backbone(cfg)
