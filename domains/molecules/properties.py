"""Property prediction for conditional generation: EDM's evaluation protocol and predictor gradient guidance.

EDM (Hoogeboom et al. 2022, Sec. 5.2 / Table 3) judges a property-conditional generator with an EGNN property
predictor trained on the first ("predictor") half of the QM9 training split: the MAE between the predicted
property of each generated molecule and the value it was asked for. Two rows frame that number, both on
molecules of the second ("generator") half:

* **QM9 lower bound** -- the predictor on real molecules with their true labels (its own error);
* **shuffled labels** -- the same molecules with the labels permuted (what a generator ignoring the
  condition would score);

plus **n atoms only** (EDM's "#Atoms" row): predicting each label by the mean label of molecules with the same
atom count, i.e. what conditioning only on the size would reach.

The predictor trains with ``multidiff train molecules --config property_predictor`` and is read by
``MoleculesDomain.load_predictor``; point ``data.predictor`` at its run (or checkpoint file) to get these metrics
from ``multidiff evaluate molecules`` and to steer sampling with ``--gradient-scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from domains.molecules.constants import ATOMIC_NUMBERS, ELEMENTS
from domains.molecules.features import atom_rows
from domains.molecules.metrics import MoleculeLike, as_arrays

__all__ = ["PropertyPredictor", "predictor_from_run", "molecule_batch", "property_baselines", "property_metrics",
           "guidance_log_prob", "BASELINE_MOLECULES"]

BASELINE_MOLECULES = 5000  # generator-half molecules used for the baseline rows (fixed seed)


@dataclass
class PropertyPredictor:
    """A trained ``EGNNPredictor`` with the property names and the normalisation it was trained with."""

    net: nn.Module
    names: list[str]
    mean: Tensor  # [P] training mean (physical units)
    mad: Tensor  # [P] training mean absolute deviation
    include_charges: bool
    path: Path
    step: int | None = None

    def normalized(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """[B, P] predictions in the training normalisation (value - mean) / MAD; differentiable in ``x``."""
        return self.net(x, batch, num_graphs)

    def __call__(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """[B, P] predictions in physical units (see ``PROPERTY_UNITS``)."""
        return self.normalized(x, batch, num_graphs) * self.mad.to(x) + self.mean.to(x)

    @torch.no_grad()
    def predict(self, mols: Sequence[MoleculeLike], batch_size: int = 512) -> Tensor:
        """[len(mols), P] float64 predictions in physical units, in chunks of ``batch_size`` molecules."""
        outs = []
        for i in range(0, len(mols), batch_size):
            x, batch, num = molecule_batch(mols[i : i + batch_size], self.include_charges)
            device = self.mean.device
            outs.append(self(x.to(device), batch.to(device), num).to(torch.float64).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, len(self.names), dtype=torch.float64)


def molecule_batch(mols: Sequence[MoleculeLike], include_charges: bool = True) -> tuple[Tensor, Tensor, int]:
    """Molecules -> (rows ``[pos | one-hot * 0.25 | Z * 0.1]`` with each molecule centred, batch index, count)."""
    rows, sizes = [], []
    for mol in mols:
        pos, idx = as_arrays(mol)
        pos_t = torch.as_tensor(pos, dtype=torch.float32)
        z = torch.tensor([ATOMIC_NUMBERS[ELEMENTS[i]] for i in idx.tolist()], dtype=torch.long)
        rows.append(atom_rows(pos_t - pos_t.mean(0), z, include_charges))
        sizes.append(len(z))
    if not rows:
        raise ValueError("no molecules to predict properties for")
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.cat(rows), batch, len(sizes)


def predictor_from_run(run: Any, device: str = "cpu") -> PropertyPredictor:
    """The property predictor of a ``multidiff.registry.Run`` of ``--config property_predictor`` (read by
    ``MoleculesDomain.load_predictor``, which checks the run is one)."""
    data = run.cfg.data
    if len(data.property_mean) != len(data.conditioning) or len(data.property_mad) != len(data.conditioning):
        raise ValueError(f"{run.path}: the embedded config lacks the property mean/MAD the predictor was trained with")
    module = run.domain.training_module(run.cfg)
    assert module is not None
    run.load_into(module, what="predictor")
    net = module.predictor.to(device).eval().requires_grad_(False)
    return PropertyPredictor(net, list(data.conditioning), torch.tensor(data.property_mean, device=device),
                             torch.tensor(data.property_mad, device=device), data.include_charges, run.path, run.step)


def _mae(a: Tensor, b: Tensor) -> Tensor:
    return (a.to(torch.float64) - b.to(torch.float64)).abs().mean(0)


def property_baselines(predictor: PropertyPredictor, qm9: Any, rows: np.ndarray, num: int = BASELINE_MOLECULES,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """EDM Table 3's reference rows on ``num`` molecules of ``rows`` (the generator half): per property,
    ``qm9`` (predictor on true labels), ``shuffled`` (permuted labels) and ``n_atoms`` (mean label given n)."""
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows)
    pick = np.sort(rng.choice(len(rows), size=min(num, len(rows)), replace=False))
    sel = rows[pick]
    cols = [qm9.property_names.index(n) for n in predictor.names]
    truth = qm9.properties[torch.from_numpy(sel)][:, cols].to(torch.float64)
    pred = predictor.predict([qm9.molecule(int(i)) for i in sel])
    shuffled = truth[torch.from_numpy(rng.permutation(len(sel)))]
    # "#Atoms": the mean label of the generator half's molecules with the same atom count
    n_all = qm9.num_atoms.numpy()[rows]
    all_truth = qm9.properties[torch.from_numpy(rows)][:, cols].to(torch.float64)
    n_sel = torch.from_numpy(qm9.num_atoms.numpy()[sel])
    by_n = torch.zeros(int(n_all.max()) + 1, len(cols), dtype=torch.float64)
    count = torch.zeros(int(n_all.max()) + 1, dtype=torch.float64)
    by_n.index_add_(0, torch.from_numpy(n_all), all_truth)
    count.index_add_(0, torch.from_numpy(n_all), torch.ones(len(n_all), dtype=torch.float64))
    n_pred = by_n[n_sel] / count[n_sel].unsqueeze(-1)
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(predictor.names):
        out[name] = {"qm9": float(_mae(pred[:, k], truth[:, k])), "shuffled": float(_mae(pred[:, k], shuffled[:, k])),
                     "n_atoms": float(_mae(n_pred[:, k], truth[:, k])), "molecules": float(len(sel))}
    return out


def property_metrics(predictor: PropertyPredictor, mols: Sequence[MoleculeLike],
                     targets: dict[str, Sequence[float]], baselines: dict[str, dict[str, float]] | None = None,
                     ) -> dict[str, float]:
    """``{prop}_mae`` of the predictor on generated molecules against the values they were asked for, the
    mean prediction, and the baseline rows beside it (``{prop}_mae_qm9_lower_bound``, ``..._shuffled_labels``,
    ``..._n_atoms_only``)."""
    pred = predictor.predict(mols)
    out: dict[str, float] = {}
    for k, name in enumerate(predictor.names):
        out[f"{name}_predicted_mean"] = float(pred[:, k].mean())
        if name in targets:
            target = torch.tensor([float(v) for v in targets[name]], dtype=torch.float64)
            if len(target) != len(mols):
                raise ValueError(f"{name}: {len(target)} target values for {len(mols)} molecules")
            out[f"{name}_mae"] = float(_mae(pred[:, k], target))
        if baselines is not None and name in baselines:
            b = baselines[name]
            out[f"{name}_mae_qm9_lower_bound"] = b["qm9"]
            out[f"{name}_mae_shuffled_labels"] = b["shuffled"]
            out[f"{name}_mae_n_atoms_only"] = b["n_atoms"]
    return out


def guidance_log_prob(predictor: PropertyPredictor, targets: Tensor, names: Sequence[str], batch: Tensor,
                      num_graphs: int, include_charges: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """``log p(y | x0) = -sum_p |f_p(x0) - y_p| / MAD_p`` per molecule, for reconstruction guidance.

    A Laplace likelihood, the one the predictor's L1 training fits; unlike a Gaussian its gradient does not grow
    with the error, which matters at high noise where the x0 estimate is far outside the predictor's training
    data. ``x0`` are the denoiser's rows ``[pos | features]``; ``targets`` [B, len(names)] are in physical units
    and ``names`` must be properties the predictor predicts.
    """
    unknown = [n for n in names if n not in predictor.names]
    if unknown:
        raise ValueError(f"the property predictor {predictor.path} predicts {predictor.names}, not {unknown}")
    if predictor.include_charges != include_charges:
        raise ValueError(f"{predictor.path}: trained with include_charges={predictor.include_charges}, the generator "
                         f"with {include_charges}; their atom features differ")
    cols = [predictor.names.index(n) for n in names]
    mean, mad = predictor.mean[cols], predictor.mad[cols]
    y = (targets.to(mean) - mean) / mad

    def log_prob(x0: Tensor, t: Tensor) -> Tensor:
        pred = predictor.normalized(x0, batch.to(x0.device), num_graphs)[:, cols]
        return -(pred - y.to(pred)).abs().sum(-1)

    return log_prob

