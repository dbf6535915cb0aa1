"""Property predictor: EDM's property-MAE protocol with its baseline rows, and predictor gradient guidance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from multidiff import pipeline
from multidiff.registry import get_domain

from domains.molecules.data import QM9, _resolve_indices, load_qm9
from domains.molecules.domain import MolData, MoleculesDomain, _samples_targets
from domains.molecules.properties import PropertyPredictor, property_baselines, property_metrics
from tests.molecules.test_mol_domain import cli, last_json, squash

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "molecules.safetensors"
# EDM Table 3, "#Atoms" row: MAE of predicting each property from the atom count alone (Hoogeboom et al. 2022).
EDM_N_ATOMS_MAE = {"alpha": 3.86, "gap": 866.0, "homo": 426.0, "lumo": 813.0, "mu": 1.053, "Cv": 1.971}


@pytest.fixture(scope="module")
def qm9() -> QM9:
    return load_qm9(progress=False)


class Constant(nn.Module):
    """Predicts the same normalised value for every molecule."""

    def __init__(self, value: float, outputs: int) -> None:
        super().__init__()
        self.value, self.outputs = value, outputs

    def forward(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        return torch.full((num_graphs, self.outputs), self.value, dtype=x.dtype)


class Gyration(nn.Module):
    """Differentiable toy property: mean squared distance of the atoms from their centroid (Angstrom^2)."""

    def forward(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        pos = x[:, :3]
        centre = scatter(pos, batch, dim=0, dim_size=num_graphs, reduce="mean")
        return scatter((pos - centre[batch]).pow(2).sum(-1), batch, dim=0, dim_size=num_graphs, reduce="mean")[:, None]


def fake(net: nn.Module, names: list[str]) -> PropertyPredictor:
    p = len(names)
    return PropertyPredictor(net, names, torch.zeros(p), torch.ones(p), True, Path("fake"))


def test_n_atoms_baseline_matches_edm_and_constant_predictor_rows(qm9: QM9) -> None:
    names = list(EDM_N_ATOMS_MAE)
    rows = _resolve_indices(len(qm9), "generator")
    base = property_baselines(fake(Constant(0.0, len(names)), names), qm9, rows, num=len(rows))
    for name, edm in EDM_N_ATOMS_MAE.items():
        assert abs(base[name]["n_atoms"] - edm) < 0.015 * edm, (name, base[name]["n_atoms"], edm)
        # a predictor that ignores the molecule scores the same on true and on shuffled labels
        assert base[name]["qm9"] == pytest.approx(base[name]["shuffled"], rel=1e-12)
        truth = qm9.property(name)[torch.from_numpy(rows)].to(torch.float64)
        assert base[name]["qm9"] == pytest.approx(float(truth.abs().mean()), rel=1e-9)


def test_property_metrics_mae_against_written_targets(qm9: QM9, tmp_path: Path) -> None:
    mols = [qm9.molecule(i) for i in range(5)]
    targets = {"alpha": [1.0, 2.0, 3.0, 4.0, 10.0]}
    out = property_metrics(fake(Constant(3.0, 1), ["alpha"]), mols, targets)
    assert out["alpha_mae"] == pytest.approx((2 + 1 + 0 + 1 + 7) / 5) and out["alpha_predicted_mean"] == 3.0
    # targets travel in the XYZ comment lines written by `multidiff sample`
    dom = get_domain("molecules")
    from domains.molecules.domain import MolSamples

    dom.write(MolSamples([(p.numpy(), z.numpy()) for p, z in mols], targets), tmp_path)
    assert _samples_targets(tmp_path) == targets


def test_gradient_guidance_steers_the_predicted_property(monkeypatch: pytest.MonkeyPatch) -> None:
    """--gradient-scale pulls the predictor's value of the samples toward the asked-for target."""
    monkeypatch.setattr(MoleculesDomain, "load_predictor", lambda self, path: fake(Gyration(), ["alpha"]))
    model = pipeline.load_model(SHIPPED)
    model.cfg.data.predictor = "gyration"
    req = model.domain.request(model.cfg, 24, {"alpha": "8", "n": "14"}, seed=0)
    assert req.cond is None and req.meta["properties"]["alpha"] == [8.0] * 24  # a guidance target, not a condition

    def run(scale: float) -> Tensor:
        x = pipeline.generate(model, req, sampler="dpmpp_2m", steps=20, gradient_scale=scale,
                              generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(x).all()
        com = torch.zeros(24, 3).index_add_(0, req.kwargs["batch"], x[:, :3]) / 14
        assert com.abs().max() < 1e-4
        return Gyration()(x, req.kwargs["batch"], 24)[:, 0]

    plain, guided = run(0.0), run(10.0)  # the shipped model's 14-atom samples: about 5.5 A^2
    assert guided.mean() > plain.mean() + 1.0
    assert (guided - 8.0).abs().mean() < 0.5 * (plain - 8.0).abs().mean()


def test_predictor_cli_train_sample_evaluate(tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    last_json(cli("train", "molecules", "--config", "property_predictor", "model.hidden=16", "model.layers=2",
                  "train.steps=10", "train.batch_size=16", "data.max_molecules=256", "--out", str(pred), "--no-progress"))
    loaded = MoleculesDomain().load_predictor(pred)
    assert loaded.names == ["alpha"] and loaded.step == 10
    out = tmp_path / "s"
    res = last_json(cli("sample", "molecules", f"data.predictor={pred}", "sample.batch_size=4", "--condition", "alpha=70", "--num", "6",
                        "--steps", "8", "--gradient-scale", "1", "--out", str(out), "--no-progress"))
    m = res["metrics"]
    assert m["num_molecules"] == 6 and _samples_targets(out) == {"alpha": [70.0] * 6}  # two chunks, one set
    for key in ("alpha_mae", "alpha_mae_qm9_lower_bound", "alpha_mae_shuffled_labels", "alpha_mae_n_atoms_only"):
        assert np.isfinite(m[key]), key
    again = last_json(cli("evaluate", "molecules", str(out), f"data.predictor={pred}"))
    assert again["alpha_mae"] == pytest.approx(m["alpha_mae"], rel=1e-6)
    assert json.loads((out / "metrics.json").read_text())["alpha_mae"] == pytest.approx(m["alpha_mae"])

    # a denoiser is not a predictor; a property without a predictor lists what to do; no model.* at sampling
    with pytest.raises(ValueError, match="not a molecular property predictor"):
        MoleculesDomain().load_predictor(SHIPPED)
    p = cli("sample", "molecules", "--condition", "alpha=70", "--num", "2", "--out", str(tmp_path / "x"))
    assert p.returncode != 0 and "data.predictor" in squash(p.stderr)
    p = cli("sample", "molecules", "model.hidden=8", "--num", "2", "--out", str(tmp_path / "y"))
    assert p.returncode != 0 and "onlydata.*andsample.*" in squash(p.stderr)
    p = cli("sample", "molecules", f"data.predictor={pred}", "--num", "2", "--gradient-scale", "1", "--out", str(tmp_path / "z"))
    assert p.returncode != 0 and "--conditionalpha=VALUE" in squash(p.stderr)
