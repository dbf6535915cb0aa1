"""Progressive distillation (``multidiff distill``): a toy student sampled in 2 DDIM steps is close to its guided
teacher on the refined grid, it is an ordinary checkpoint, and bad input is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multidiff import pipeline
from multidiff.distill import distill, refine_grid
from multidiff.registry import get_domain
from multidiff.samplers import get_sampler, prior
from multidiff.schedules import get_schedule, make_grid


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    dom = get_domain("toy")
    cfg = pipeline.load_run_config(dom, None, ["train.steps=500", "train.ckpt_every=500", "model.hidden=64"])
    pipeline.train(dom, cfg, run, device="cpu", progress=False)
    return run


def test_refine_grid_nests_and_keeps_the_last_step() -> None:
    sch = get_schedule("cosine")
    ts = make_grid(sch, 2, "karras")
    fine = refine_grid(sch, ts)
    assert fine.numel() == 4 and torch.equal(fine[[0, 2, 3]], ts)  # the interval to sigma = 0 is not split
    lam = sch.logsnr(fine[:3])
    assert torch.allclose(lam[1], 0.5 * (lam[0] + lam[2]))
    flow = get_schedule("flow")  # t = 1 is pure noise (logSNR = -inf): that interval is split at its t midpoint
    assert torch.allclose(refine_grid(flow, make_grid(flow, 2, "uniform")), torch.tensor([1.0, 0.75, 0.5, 0.0], dtype=torch.float64))


def test_two_step_student_is_close_to_its_guided_teacher(teacher: Path, tmp_path: Path) -> None:
    model = pipeline.load_model(teacher)
    path = distill(model, 2, tmp_path / "student", rounds=3, iters=150, lr=1e-3, batch_size=256, guidance=2.0)
    student = pipeline.load_model(tmp_path / "student")  # an ordinary checkpoint
    assert path.is_dir() and student.cfg.sample.steps == 2 and student.cfg.sample.sampler == "ddim"
    assert student.cfg.sample.guidance == 1.0
    sch = model.denoiser.schedule
    labels = torch.arange(1000) % 8
    ts2 = make_grid(sch, 2, "karras")
    fine = ts2
    for _ in range(3):
        fine = refine_grid(sch, fine)
    x = prior(sch, ts2[0], torch.zeros(1000, 2), None, torch.Generator().manual_seed(5))
    from multidiff.guidance import ClassifierFreeGuidance

    guided = ClassifierFreeGuidance(lambda xx, t, c: model.denoiser(xx, t, c), {"label": labels}, 2.0)
    with torch.no_grad():
        ref = get_sampler("ddim")(guided, x, fine, sch)  # the teacher on its 9-interval grid, 2 passes per step
        teacher2 = get_sampler("ddim")(guided, x, ts2, sch)
        out = get_sampler("ddim")(lambda xx, t: student.denoiser(xx, t, {"label": labels}), x, ts2, sch)
    err = float((out - ref).pow(2).sum(1).sqrt().mean())
    base = float((teacher2 - ref).pow(2).sum(1).sqrt().mean())
    assert err < 0.5 * base, (err, base)
    dom = get_domain("toy")
    assert dom.metrics({"x": out, "label": labels}, model.cfg.data)["conditional_accuracy"] > 0.95


def test_bad_input_is_named(teacher: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    model = pipeline.load_model(teacher)
    with pytest.raises(ValueError, match="--steps"):
        distill(model, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="--grid: unknown grid 'karas'"):
        distill(model, 2, tmp_path / "x", grid="karas")
    env = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "multidiff.cli", "distill", "audio", "--checkpoint", str(teacher),
                        "--steps", "2", "--out", str(tmp_path / "y")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0 and "for domain 'toy', not 'audio'" in p.stderr


def _student_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _distill_meta(path: Path) -> dict:
    import json

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["distill"])


def test_max_minutes_bounds_each_round_and_is_recorded(teacher: Path, tmp_path: Path) -> None:
    import time

    model = pipeline.load_model(teacher)
    t0 = time.monotonic()
    path = distill(model, 2, tmp_path / "s", rounds=2, iters=10**7, batch_size=16, max_minutes=0.02)
    took = time.monotonic() - t0
    meta = _distill_meta(path)
    assert len(meta["iters_done"]) == 2 and all(1 <= n < 10**7 for n in meta["iters_done"]), meta
    assert took < 30 and meta["minutes"] < 0.5, (took, meta)
    assert pipeline.load_model(tmp_path / "s").cfg.sample.steps == 2
    with pytest.raises(ValueError, match="--max-minutes"):
        distill(model, 2, tmp_path / "x", max_minutes=0)


def test_the_teacher_is_guided_only_in_the_checkpoint_guidance_interval(teacher: Path, tmp_path: Path) -> None:
    """An interval that holds none of the grid's times leaves the teacher plain conditional: the student is bit for
    bit the one distilled at guidance 1, and a different one without the interval."""
    kw = dict(rounds=1, iters=3, batch_size=16, lr=1e-3, seed=3)
    plain = _student_state(distill(pipeline.load_model(teacher), 2, tmp_path / "plain", guidance=1.0, **kw))
    guided = _student_state(distill(pipeline.load_model(teacher), 2, tmp_path / "guided", guidance=3.0, **kw))
    model = pipeline.load_model(teacher)
    model.cfg.sample.guidance_interval = (0.0, 1e-6)  # grid times are >= t_min = 1e-4
    path = distill(model, 2, tmp_path / "outside", guidance=3.0, **kw)
    outside = _student_state(path)
    assert _distill_meta(path)["guidance_interval"] == [0.0, 1e-6]
    assert all(torch.equal(outside[k], plain[k]) for k in plain)
    assert any(not torch.equal(guided[k], plain[k]) for k in plain)


# --- categorical parts ----------------------------------------------------------------------------------------------


def _jump_matrix(p: torch.Tensor, k_from: float, k_to: float) -> torch.Tensor:
    """Transition matrix of one jump (module doc of multidiff.categorical): keep w.p. k_to / k_from, else draw from p."""
    return (k_to / k_from) * torch.eye(p.shape[0], dtype=torch.float64) + (1 - k_to / k_from) * p


def test_one_jump_to_the_two_jump_probs_has_the_law_of_two_teacher_jumps() -> None:
    """The student's categorical target: one jump t -> s with two_jump_probs(p1, p2 at the reached x_m) moves x_t
    like the Markov chain of the teacher's two jumps, T = J(p1; t -> m) J(p2; m -> s), cell by cell; either teacher's
    probabilities alone do not."""
    from multidiff.categorical import jump, two_jump_probs

    k_t, k_m, k_s = 0.8, 0.45, 0.15
    p1 = torch.softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0], [-1.0, 0.0, 1.5]], dtype=torch.float64), -1)
    p2 = torch.softmax(torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 1.0], [2.5, 0.0, 0.0]], dtype=torch.float64), -1)
    exact = _jump_matrix(p1, k_t, k_m) @ _jump_matrix(p2, k_m, k_s)  # rows: x_t, columns: x_s
    n, g = 300_000, torch.Generator().manual_seed(0)
    a = torch.randint(3, (n,), generator=g)
    x_t = torch.nn.functional.one_hot(a, 3).double()
    x_m = jump(x_t, p1[a], k_t, k_m, g)  # one draw of x_m per row, as in distillation
    b = x_m.argmax(-1)

    def transition(probs: torch.Tensor) -> torch.Tensor:
        x_s = jump(x_t, probs, k_t, k_s, g).argmax(-1)
        counts = torch.zeros(3, 3, dtype=torch.float64).index_put_((a, x_s), torch.ones(n, dtype=torch.float64), True)
        return counts / counts.sum(1, keepdim=True)

    target = two_jump_probs(p1[a], p2[b], k_t, k_m, k_s)
    assert torch.allclose(target.sum(-1), torch.ones(n, dtype=torch.float64))
    assert (transition(target) - exact).abs().max() < 0.006
    assert (transition(p1[a]) - exact).abs().max() > 0.05
    assert (transition(p2[b]) - exact).abs().max() > 0.05
    with pytest.raises(ValueError, match="0 < k_s < k_m < k_t"):
        two_jump_probs(p1, p2, 0.5, 0.6, 0.1)


class _PointsWithClass:
    """A two-part test domain: a 2-D point whose mean is set by its class, Euclidean(2) x Categorical(3)."""

    name = "toy"  # the student checkpoint carries the toy recipe it was given
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    pi = torch.tensor([0.5, 0.3, 0.2])

    def __init__(self) -> None:
        from multidiff.spaces import Categorical, Euclidean, Product

        self.product = Product([(slice(0, 2), Euclidean()), (slice(2, 5), Categorical(3))])

    def draw(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        c = torch.multinomial(self.pi, n, replacement=True, generator=g)
        x = self.means[c] + 0.1 * torch.randn(n, 2, generator=g)
        return torch.cat([x, torch.nn.functional.one_hot(c, 3).float()], -1)

    def build_dataset(self, cfg, split):  # noqa: ANN001, ANN201
        return list(self.draw(4096, 0))

    def collate_fn(self, cfg):  # noqa: ANN001, ANN201
        return torch.stack

    def unpack(self, batch):  # noqa: ANN001, ANN201
        return batch, None, {}

    def space(self, batch):  # noqa: ANN001, ANN201
        return self.product

    def score(self, x: torch.Tensor) -> tuple[float, float]:
        """(total variation of the class frequencies from pi, share of points nearest to their own class's mean)."""
        c = x[:, 2:].argmax(-1)
        tv = 0.5 * float((torch.bincount(c, minlength=3) / len(c) - self.pi).abs().sum())
        near = torch.cdist(x[:, :2].float(), self.means).argmin(-1)
        return tv, float((near == c).float().mean())


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                                       torch.nn.SiLU(), torch.nn.Linear(128, 5))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return self.net(torch.cat([x, c_noise.reshape(-1, 1).expand(x.shape[0], 1)], -1))


def test_a_model_with_a_categorical_part_distils(tmp_path: Path) -> None:
    """Positions and classes together (Euclidean x Categorical): a 4-step student distilled from the 7-step teacher
    keeps the class law closer, puts more points at their own class's mean and more points at any mean than the
    teacher sampled in the same 4 steps (margins: half of what this seed shows)."""
    import copy

    from multidiff.diffusion import Denoiser

    torch.manual_seed(0)
    dom = _PointsWithClass()
    den = Denoiser(_MLP(), "flow", target="x0", categorical_weight=1.0)
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    data = dom.draw(4096, 0)
    for _ in range(1500):
        loss = den.loss(data[torch.randint(4096, (256,), generator=g)], space=dom.product, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = pipeline.load_run_config(get_domain("toy"), None, ["sample.guidance=1", "train.batch_size=256"])
    model = pipeline.LoadedModel(dom, cfg, den.eval(), 1500, tmp_path / "teacher")
    path = distill(model, 4, tmp_path / "student", rounds=1, iters=600, lr=1e-3, grid="karras")
    student = copy.deepcopy(den)
    student.load_state_dict({k.removeprefix("model."): v for k, v in _student_state(path).items()})
    sch = den.schedule

    def score(net: torch.nn.Module, steps: int) -> tuple[float, float, float]:
        ts = make_grid(sch, steps, "karras")
        gen = torch.Generator().manual_seed(7)
        x = prior(sch, ts[0], torch.zeros(4000, 5), dom.product, gen)
        with torch.no_grad():
            x = get_sampler("ddim")(lambda xx, t: net(xx, t, None, space=dom.product), x, ts, sch, dom.product,
                                    generator=gen)
        sharp = float((torch.cdist(x[:, :2], dom.means).min(-1).values < 0.5).float().mean())
        return (*dom.score(x), sharp)

    tv16, near16, _ = score(den, 16)
    tv4, near4, sharp4 = score(den, 4)
    tv_s, near_s, sharp_s = score(student, 4)
    assert tv16 < 0.05 and near16 > 0.95, (tv16, near16)  # the teacher learned the joint law
    assert tv_s < tv4 - 0.03, (tv_s, tv4)  # 0.066 vs 0.134
    assert near_s > near4 + 0.02, (near_s, near4)  # 0.948 vs 0.901
    assert sharp_s > sharp4 + 0.08, (sharp_s, sharp4)  # 0.519 vs 0.360


class _SelfCondMLP(_MLP):
    """``_MLP`` that takes a self-conditioning input and records whether it got one."""

    supports_self_conditioning = True

    def __init__(self) -> None:
        super().__init__()
        self.got_self_cond: list[bool] = []

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: dict | None = None,
                self_cond: torch.Tensor | None = None) -> torch.Tensor:
        self.got_self_cond.append(self_cond is not None)
        return super().forward(x, c_noise, cond)


def test_a_self_conditioned_teacher_gives_a_student_that_samples_without_it(tmp_path: Path) -> None:
    """The teacher is queried without a self-conditioning input, so the student is trained and sampled without one
    (sample.self_condition false; diffusion.self_condition, which shapes the network, is kept)."""
    from multidiff.diffusion import Denoiser

    dom = _PointsWithClass()
    den = Denoiser(_SelfCondMLP(), "flow", target="x0", self_condition=0.5)
    cfg = pipeline.load_run_config(get_domain("toy"), None, ["sample.guidance=1", "train.batch_size=64",
                                                              "diffusion.self_condition=0.5"])
    model = pipeline.LoadedModel(dom, cfg, den.eval(), 0, tmp_path / "teacher")
    path = distill(model, 2, tmp_path / "student", rounds=1, iters=3, lr=1e-3)
    assert den.backbone.got_self_cond and not any(den.backbone.got_self_cond)  # the teacher never got one
    import json

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["config"])
    assert saved["sample"]["self_condition"] is False and saved["diffusion"]["self_condition"] == 0.5
