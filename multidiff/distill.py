"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) with classifier-free guidance distilled in (Meng et al.
2023): a student that samples in ``steps`` DDIM steps, one network pass per step, saved as an ordinary checkpoint.

The student's grid is the sampling grid ``make_grid(schedule, steps, grid)``; round r's teacher grid refines every
interval of the student's by its logSNR midpoint (the last interval to sigma = 0 stays whole), so after R rounds the
original model is the teacher on a grid of about steps * 2^R points (an interval from pure noise, logSNR = -inf, is
split at its t midpoint). Each round the student (initialised from the teacher) learns, for x_t = alpha_t x0 +
sigma_t n on one of its grid points, the x0 that takes one DDIM step t -> s to where two teacher DDIM steps
t -> mid -> s land (deterministic for continuous states; with categorical parts the first jump is drawn, so the
target is a one-sample estimate and the student learns its mean):
    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - sigma_s alpha_t / sigma_t)   (x~ = the teacher's x0 when s = 0),
weighted by max(SNR_t, 1) ("truncated SNR"). Categorical parts (``spaces.Categorical``) learn, by KL divergence
x the recipe's ``categorical_weight``, the class probabilities whose one jump t -> s has the law of the teacher's two
jumps (``categorical.two_jump_probs``). The first teacher is guided (scale w, two passes), the students are not:
their checkpoint says ``sample.sampler=ddim``, ``sample.steps``, ``sample.guidance=1``.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .categorical import corrupt, jump, kappa, two_jump_probs
from .checkpoint import save_checkpoint
from .config import config_to_dict
from .guidance import ClassifierFreeGuidance
from .schedules import GRIDS, Schedule, make_grid
from .spaces import Categorical

__all__ = ["refine_grid", "distill"]


def refine_grid(schedule: Schedule, ts: Tensor) -> Tensor:
    """Insert the logSNR midpoint into every interval of ``ts`` that ends at sigma > 0 (the t midpoint where an end
    is pure noise, logSNR = -inf, e.g. t = 1 on the ``flow`` schedule)."""
    out = [float(ts[0])]
    lam = schedule.logsnr(ts.to(torch.float64))
    for i in range(ts.numel() - 1):
        if float(schedule.sigma(ts[i + 1].to(torch.float64))) > 0:
            if math.isfinite(float(lam[i])) and math.isfinite(float(lam[i + 1])):
                out.append(float(schedule.t_from_logsnr(0.5 * (lam[i] + lam[i + 1]))))
            else:
                out.append(0.5 * (float(ts[i]) + float(ts[i + 1])))
        out.append(float(ts[i + 1]))
    return torch.tensor(out, dtype=torch.float64)


def _ddim(x: Tensor, d: Tensor, a_t: float, s_t: float, a_s: float, s_s: float) -> Tensor:
    return a_s * d + (s_s / s_t) * (x - a_t * d)


def _x_tilde(z_s: Tensor, z_t: Tensor, a_t: float, s_t: float, a_s: float, s_s: float) -> Tensor:
    """The x0 whose one DDIM step t -> s (s > 0) lands on ``z_s`` (the module doc's x~)."""
    return (z_s - (s_s / s_t) * z_t) / (a_s - s_s * a_t / s_t)


def _on_simplex(d: Tensor, discrete: list[tuple[slice, Categorical]]) -> Tensor:
    """Categorical parts of a (guided) estimate clamped at 0 and renormalised, the law ``categorical.jump`` draws
    from (guidance d_u + w (d_c - d_u) can leave the simplex)."""
    if not discrete:
        return d
    d = d.clone()
    for sl, _ in discrete:
        p = d[..., sl].clamp_min(0)
        d[..., sl] = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return d


def distill(
    model: Any,
    steps: int,
    out: Path | str,
    *,
    rounds: int | None = None,
    iters: int = 300,
    batch_size: int | None = None,
    lr: float = 1e-4,
    guidance: float | None = None,
    grid: str | None = None,
    seed: int = 0,
    max_minutes: float | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Distil ``model`` (a ``pipeline.LoadedModel``) into a ``steps``-step DDIM student written to ``out`` as a run
    directory; ``rounds`` halvings (default: teacher grid of >= the checkpoint's sample.steps), ``iters`` per round.

    ``max_minutes`` bounds the training wall-clock: each round gets an equal share of the time left when it starts
    and stops at ``iters`` or at its share, whichever comes first (the iterations done are in the checkpoint's
    ``distill`` metadata). The guided teacher applies the checkpoint's ``sample.guidance_interval`` (plain conditional
    outside it), as ``multidiff sample`` does."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps: expected an integer >= 1, got {steps!r}")
    if iters < 1 or lr <= 0:
        raise ValueError(f"iters, lr: expected >= 1 and > 0, got {iters}, {lr}")
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise ValueError(f"--max-minutes: expected a number > 0, got {max_minutes}")
    start = time.monotonic()
    deadline = None if max_minutes is None else start + 60.0 * max_minutes
    dom, cfg, teacher = model.domain, model.cfg, model.denoiser
    schedule = teacher.schedule
    grid = grid or cfg.sample.grid
    if grid not in GRIDS:
        raise ValueError(f"--grid: unknown grid {grid!r}; expected one of {sorted(GRIDS)}")
    w = float(cfg.sample.guidance if guidance is None else guidance)
    interval = cfg.sample.guidance_interval
    interval = tuple(float(v) for v in interval) if interval is not None else None
    if rounds is None:
        rounds = max(1, math.ceil(math.log2(max(cfg.sample.steps, 2 * steps) / steps)))
    grids = [make_grid(schedule, steps, grid)]
    for _ in range(rounds):
        grids.append(refine_grid(schedule, grids[-1]))
    dataset = dom.build_dataset(cfg, "train")
    bs = batch_size or cfg.train.batch_size
    gen = torch.Generator().manual_seed(seed)
    collate = dom.collate_fn(cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=len(dataset) >= bs,
                                         collate_fn=collate, generator=gen)
    batches = iter(loader)

    def next_batch() -> Any:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    device = next(teacher.parameters()).device
    current = teacher.eval().requires_grad_(False)
    done: list[int] = []
    for r in range(rounds):
        round_end = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (rounds - r)
        coarse, fine = grids[rounds - 1 - r], grids[rounds - r]  # student grid, teacher grid (refined)
        guided = r == 0 and w != 1.0
        student = copy.deepcopy(current).train().requires_grad_(True)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        it = -1
        for it in range(iters):
            if round_end is not None and it > 0 and time.monotonic() >= round_end:
                it -= 1
                break
            batch = next_batch()
            x0, cond, kwargs = dom.unpack(batch)
            x0, space = x0.to(device), dom.space(batch)
            discrete = space.discrete_parts()
            num = space.num_samples if space.num_samples is not None else x0.shape[0]
            j = torch.randint(coarse.numel() - 1, (), generator=gen).item()  # one grid interval per batch
            t, s = coarse[j], coarse[j + 1]
            a_t, s_t = float(schedule.alpha(t)), float(schedule.sigma(t))
            a_s, s_s = float(schedule.alpha(s)), float(schedule.sigma(s))
            x0, noise = space.project(x0), teacher.kernel.noise(x0, space, gen)
            z_t = (a_t * x0 + s_t * noise).to(x0.dtype)
            k_t = float(kappa(schedule, t))
            for sl, part in discrete:  # categorical parts: uniform corruption with probability kappa(t)
                z_t[..., sl] = corrupt(x0[..., sl], noise[..., sl], k_t, gen, part.batch)

            def teach(x: Tensor, tt: Tensor) -> Tensor:
                fn = lambda xx, ttt, c: current(xx, ttt, c, space=space, **kwargs)  # noqa: E731
                if guided and cond is not None:
                    return ClassifierFreeGuidance(fn, cond, w, num_samples=num, batched=False, interval=interval)(x, tt)
                return fn(x, tt, cond)

            with torch.no_grad():
                d_t = _on_simplex(teach(z_t, t), discrete)
                k = int(torch.nonzero(fine == t)[0])  # t -> fine[k + 1] (the midpoint) -> s
                if s_s == 0 or fine[k + 1] == s:  # an interval the teacher takes in one step (the last, to sigma = 0)
                    target = d_t if s_s == 0 else _x_tilde(_ddim(z_t, d_t, a_t, s_t, a_s, s_s), z_t, a_t, s_t, a_s, s_s)
                    probs = [d_t[..., sl] for sl, _ in discrete]
                else:
                    m = fine[k + 1]
                    a_m, s_m, k_m = float(schedule.alpha(m)), float(schedule.sigma(m)), float(kappa(schedule, m))
                    z_m = _ddim(z_t, d_t, a_t, s_t, a_m, s_m)
                    for sl, part in discrete:
                        z_m[..., sl] = jump(z_t[..., sl], d_t[..., sl], k_t, k_m, gen, part.batch)
                    d_m = _on_simplex(teach(z_m, m), discrete)
                    target = _x_tilde(_ddim(z_m, d_m, a_m, s_m, a_s, s_s), z_t, a_t, s_t, a_s, s_s)
                    k_s = float(kappa(schedule, s))
                    probs = [two_jump_probs(d_t[..., sl], d_m[..., sl], k_t, k_m, k_s) for sl, _ in discrete]
            pred, raw = student._denoise(z_t, t, cond, space, **kwargs)
            weight = max(math.exp(float(schedule.logsnr(t))), 1.0)
            per_sample = weight * space.continuous_mean_per_sample((pred.double() - target.double()) ** 2)
            for (sl, part), p in zip(discrete, probs):  # KL(p* || student) per row, x the recipe's categorical weight
                p = p.double()
                kl = (p * (p.clamp_min(1e-12).log() - torch.log_softmax(raw[..., sl].double(), -1))).sum(-1)
                per_sample = per_sample + student.categorical_weight * part.mean_per_sample(kl.unsqueeze(-1))
            loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            every = max(1, iters // 5) if deadline is None else 100
            if log is not None and (it + 1) % every == 0:
                log({"round": r + 1, "rounds": rounds, "student_steps": coarse.numel() - 1, "iter": it + 1,
                     "loss": float(loss.detach()), "minutes": round((time.monotonic() - start) / 60.0, 2)})
        done.append(it + 1)
        if log is not None:
            log({"round": r + 1, "rounds": rounds, "student_steps": coarse.numel() - 1, "iters_done": it + 1,
                 "minutes": round((time.monotonic() - start) / 60.0, 2)})
        current = student.eval().requires_grad_(False)
    # only the final student is saved: an intermediate one was trained on a refined grid that ``make_grid(N, grid)``
    # does not rebuild, and a checkpoint names only a grid kind and a step count
    student_cfg = copy.deepcopy(cfg)
    student_cfg.sample.sampler, student_cfg.sample.steps = "ddim", steps
    student_cfg.sample.grid, student_cfg.sample.guidance = grid, 1.0
    student_cfg.sample.guidance_interval = None
    # the teacher is queried without a self-conditioning input (the branch it learned with probability 1 - p) and the
    # student is trained without one, so it samples without one too (same network shape: diffusion.* is kept)
    student_cfg.sample.self_condition = False
    meta = {"distilled_from": str(model.path), "distill": {
        "steps": steps, "rounds": rounds, "iters": iters, "iters_done": done, "guidance": w,
        "guidance_interval": list(interval) if interval is not None else None, "grid": grid, "lr": lr,
        "batch_size": bs, "minutes": round((time.monotonic() - start) / 60.0, 2)}}
    return save_checkpoint(Path(out), sum(done), current.state_dict(), None, {}, config_to_dict(student_cfg), meta)
