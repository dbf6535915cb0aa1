"""PFGM++'s perturbation kernel (Xu et al. 2023): the drawn norms' law, the D -> infinity limit, zero centre of mass,
per-sample generators, bad input, and a toy model trained with D = 128 that reproduces its mixture."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import multidiff as md
from multidiff.analytic import GaussianMixture
from multidiff.config import ConfigError
from multidiff.diffusion import Denoiser, DiffusionConfig
from multidiff.kernels import Kernel, PFGMPPKernel, chi2, get_kernel
from multidiff.samplers import prior
from multidiff.schedules import get_schedule
from multidiff.spaces import Euclidean, Graph, Masked, Product, ZeroCoM


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond=None) -> torch.Tensor:
        return self.lin(x)


def _molecule_space(sizes: list[int]) -> tuple[Product, torch.Tensor]:
    """Positions (zero CoM, 3 columns) x features (4 columns) of graphs with ``sizes`` atoms."""
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    space = Product([(slice(0, 3), ZeroCoM(batch)), (slice(3, 7), Graph(batch))])
    return space, torch.zeros(int(batch.numel()), 7, dtype=torch.float64)


def _norm_law_pvalue(kernel: PFGMPPKernel, space, like: torch.Tensor, seed: int = 0) -> float:
    """KS p-value of ||n||^2 / D against BetaPrime(N/2, D/2), N = each sample's dof (mixed N via the CDF)."""
    n = kernel.noise(like, space, torch.Generator().manual_seed(seed))
    v = space.sum_per_sample(n.to(torch.float64) ** 2) / kernel.aug_dim
    dof = space.dof(like)
    u = stats.betaprime.cdf(v.numpy(), dof.numpy() / 2, kernel.aug_dim / 2)
    return float(stats.kstest(u, "uniform").pvalue)


@pytest.mark.parametrize("aug_dim", [1.0, 128.0, 2048.0])
def test_norms_follow_beta_prime_on_euclidean(aug_dim: float) -> None:
    like = torch.zeros(4000, 16, dtype=torch.float64)
    assert _norm_law_pvalue(PFGMPPKernel(aug_dim), Euclidean(), like) > 1e-3


def test_norms_follow_beta_prime_per_molecule_and_keep_zero_com() -> None:
    sizes = [int(s) for s in torch.randint(2, 20, (3000,), generator=torch.Generator().manual_seed(0))]
    space, like = _molecule_space(sizes)
    kernel = PFGMPPKernel(64.0)
    assert _norm_law_pvalue(kernel, space, like) > 1e-3  # N = 3(n-1) + 4n, different per molecule
    n = kernel.noise(like, space, torch.Generator().manual_seed(1))
    com = space.parts[0][1].centre_of_mass(n[:, :3])
    assert com.abs().max() < 1e-12
    # the prior at r_max and the training perturbation stay in the zero-CoM subspace too
    x = prior(get_schedule("karras"), 1.0, like, space, torch.Generator().manual_seed(2), kernel)
    assert space.parts[0][1].centre_of_mass(x[:, :3]).abs().max() < 1e-9


def test_norms_on_a_masked_space_count_only_real_entries() -> None:
    mask = torch.arange(12)[None, :] < torch.randint(2, 13, (3000, 1), generator=torch.Generator().manual_seed(3))
    space = Masked(mask, zero_com=True)
    like = torch.zeros(3000, 12, 3, dtype=torch.float64)
    assert _norm_law_pvalue(PFGMPPKernel(32.0), space, like) > 1e-3


def test_chi2_sampler_matches_the_law() -> None:
    for df in (0.7, 3.0, 128.0, 1e6):
        y = chi2(df, 4000, torch.Generator().manual_seed(4))
        assert stats.kstest(y.numpy(), stats.chi2(df).cdf).pvalue > 1e-3, df


def test_large_d_tends_to_the_gaussian_kernel() -> None:
    like = torch.zeros(64, 32, dtype=torch.float64)
    g = Kernel().noise(like, Euclidean(), torch.Generator().manual_seed(5))
    assert torch.equal(PFGMPPKernel(math.inf).noise(like, Euclidean(), torch.Generator().manual_seed(5)), g)
    big = PFGMPPKernel(1e10).noise(like, Euclidean(), torch.Generator().manual_seed(5))
    assert (big - g).abs().max() < 1e-3 * g.abs().max()
    # and the same training loss as the Gaussian kernel
    torch.manual_seed(0)
    net = _Linear()
    losses = []
    for kw in ({}, {"kernel": "pfgmpp", "aug_dim": 1e10}):
        den = Denoiser(net, "cosine", **kw)
        x0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        losses.append(float(den.loss(x0, generator=torch.Generator().manual_seed(7)).detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_per_sample_generators_make_a_sample_independent_of_its_batch_mates() -> None:
    kernel = PFGMPPKernel(16.0)
    like = torch.zeros(3, 10, dtype=torch.float64)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = kernel.noise(like, Euclidean(), gens([10, 11, 12]))
    alone = kernel.noise(like[:1], Euclidean(), gens([11]))
    assert torch.equal(together[1], alone[0])


def test_bad_aug_dim_and_kernel_name_are_named() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="diffusion.aug_dim"):
            get_kernel("pfgmpp", bad)
    with pytest.raises(ValueError, match="diffusion.aug_dim"):
        get_kernel("pfgmpp", None)
    with pytest.raises(ValueError, match="diffusion.aug_dim"):
        DiffusionConfig(kernel="gaussian", aug_dim=128.0)
    with pytest.raises(ValueError, match="diffusion.kernel"):
        get_kernel("poisson", 128.0)
    from multidiff.pipeline import load_run_config
    from multidiff.registry import get_domain

    with pytest.raises(ConfigError, match="aug_dim"):
        load_run_config(get_domain("toy"), None, ["diffusion.kernel=pfgmpp", "diffusion.aug_dim=-5"])
    cfg = load_run_config(get_domain("toy"), None, ["diffusion.kernel=pfgmpp", "diffusion.aug_dim=.inf"])
    assert math.isinf(cfg.diffusion.aug_dim)


def test_samplers_that_inject_gaussian_noise_are_refused() -> None:
    gm = GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), torch.tensor([1.0]))
    sch = get_schedule("cosine")
    kernel = PFGMPPKernel(128.0)
    like = torch.zeros(8, 2, dtype=torch.float64)
    for sampler, opts in (("ancestral", {}), ("euler_maruyama", {}), ("ddim", {"eta": 1.0}), ("heun", {"churn": 10.0})):
        with pytest.raises(ValueError, match=f"sampler '{sampler}'.*diffusion.kernel='pfgmpp'"):
            md.sample(gm.denoiser(sch), like, sch, sampler=sampler, steps=4, kernel=kernel, **opts)
    for sampler in ("heun", "euler", "ddim", "dpmpp_2m"):
        md.sample(gm.denoiser(sch), like, sch, sampler=sampler, steps=4, kernel=kernel)
    md.sample(gm.denoiser(sch), like, sch, sampler="ancestral", steps=4, kernel=PFGMPPKernel(math.inf))


def test_toy_model_trained_with_d128_reproduces_the_mixture() -> None:
    """A small MLP trained 1000 steps under the PFGM++ kernel (D = 128), sampled with Heun from the PFGM++ prior:
    component weights within 5 standard errors, means within 0.15, stds within 15 %, no heavy-tail stragglers."""
    from multidiff.toy import ToyMLP

    torch.manual_seed(0)
    gm = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([0.4, 0.3]))
    den = Denoiser(ToyMLP(1, hidden=64, layers=2), "karras", target="v", t_sampling="lognormal", sigma_data=1.5,
                   kernel="pfgmpp", aug_dim=128.0)
    steps, lr = 1000, 1e-2
    opt = torch.optim.Adam(den.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x0, _ = gm.sample(256, g)
        loss = den.loss(x0.float(), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    den.eval()
    num = 2000
    with torch.no_grad():
        x = md.sample(den.bind(), torch.zeros(num, 2), den.schedule, sampler="heun", steps=18, kernel=den.kernel,
                      generator=torch.Generator().manual_seed(2)).double()
    assert x.norm(dim=1).max() < 6.0  # the prior's heavy tail (R up to ~r_max) is fully transported
    comp = ((x[:, None] - gm.means[None]) ** 2).sum(-1).argmin(1)
    for k in range(2):
        w, xk = float(gm.weights[k]), x[comp == k]
        assert abs(xk.shape[0] / num - w) < 5 * math.sqrt(w * (1 - w) / num), (k, xk.shape[0] / num)
        assert (xk.mean(0) - gm.means[k]).abs().max() < 0.15, (k, xk.mean(0))
        assert (xk.std(0) / gm.stds[k] - 1).abs().max() < 0.15, (k, xk.std(0))
