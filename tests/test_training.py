"""Trainer: LR schedule, EMA, gradient accumulation, NaN handling, bf16, budgets, eval hook, data order."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from multidiff import checkpoint as ck
from multidiff.distributed import DistEnv
from multidiff.training import NonFiniteLossError, TrainConfig, Trainer, _ShardedBatches, lr_factor


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(n: int = 96) -> torch.utils.data.TensorDataset:
    """A fixed synthetic regression set."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())


def mlp() -> nn.Module:
    """The same small MLP every time."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


def mse(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Deterministic regression loss."""
    return (m(batch[0]) - batch[1]).pow(2).mean()


def records(out: Path) -> list[dict[str, Any]]:
    """Parsed log.jsonl."""
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lr_schedule_values() -> None:
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(49, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == 1.0 and lr_factor(100, cfg) == 1.0  # warm-up end: full LR
    assert lr_factor(550, cfg) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_factor(1000, cfg) == pytest.approx(0.1)  # end of training: min_lr_ratio
    assert lr_factor(999, cfg) == pytest.approx(0.1, abs=1e-5)
    const = TrainConfig(steps=1000, warmup_steps=10, lr_schedule="constant")
    assert lr_factor(4, const) == pytest.approx(0.5) and lr_factor(10, const) == lr_factor(999, const) == 1.0
    assert lr_factor(0, TrainConfig(steps=10, warmup_steps=0)) == 1.0


def test_trainer_applies_the_schedule(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=20, batch_size=16, lr=1e-2, warmup_steps=5, min_lr_ratio=0.2, log_every=1,
                      ckpt_every=0)
    Trainer(mlp(), mse, dataset(), cfg, tmp_path, progress=False).fit()
    lrs = {r["step"]: r["lr"] for r in records(tmp_path) if "lr" in r}
    assert lrs[5] == pytest.approx(1e-2)  # update 5 is the last warm-up update
    assert lrs[1] == pytest.approx(2e-3)
    assert lrs[20] == pytest.approx(1e-2 * lr_factor(19, cfg)) and lrs[20] < 2.1e-3
    assert all(lrs[s] == pytest.approx(1e-2 * lr_factor(s - 1, cfg)) for s in lrs)


def test_ema_equals_model_when_decay_is_zero(tmp_path: Path) -> None:
    for decay, expect_equal in ((0.0, True), (0.9, False)):
        model = mlp()
        cfg = TrainConfig(steps=7, batch_size=16, lr=1e-2, warmup_steps=0, ema_decay=decay, ckpt_every=0)
        trainer = Trainer(model, mse, dataset(), cfg, tmp_path / str(decay), progress=False)
        trainer.fit()
        ema = trainer.ema_model.state_dict()
        same = all(torch.equal(ema[k], v) for k, v in model.state_dict().items())
        assert same == expect_equal
        _, stored_ema, _, _ = ck.load_weights(tmp_path / str(decay) / "checkpoints" / "step_00000007" /
                                              "model.safetensors")
        assert stored_ema is not None and all(torch.equal(stored_ema[k], v) for k, v in ema.items())


def test_grad_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    finals = []
    for batch, accum in ((32, 1), (8, 4)):
        model = mlp()
        cfg = TrainConfig(steps=6, batch_size=batch, grad_accum=accum, lr=1e-2, warmup_steps=2, ckpt_every=0,
                          log_every=1)
        Trainer(model, mse, dataset(), cfg, tmp_path / f"a{accum}", progress=False).fit()
        finals.append(model.state_dict())
        finals.append([(r["loss"], r["grad_norm"]) for r in records(tmp_path / f"a{accum}") if "loss" in r])
    (big, big_loss), (small, small_loss) = finals[0:2], finals[2:4]
    for k in big:  # same samples per update, same order: only float summation order differs
        assert torch.allclose(big[k], small[k], rtol=1e-5, atol=1e-6), k
    assert not torch.equal(big["0.weight"], mlp().state_dict()["0.weight"])
    # Adam is invariant to a constant gradient scale, so also compare the (pre-clip) gradient norms
    assert np.allclose(small_loss, big_loss, rtol=1e-5)


def test_nan_loss_stops_and_names_the_step(tmp_path: Path) -> None:
    calls = {"n": 0}

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = mse(m, batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    model = mlp()
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-2, warmup_steps=0, ckpt_every=1, log_every=1)
    trainer = Trainer(model, loss_fn, dataset(), cfg, tmp_path, progress=False)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 4"):
        trainer.fit()
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in model.parameters())
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3]  # keep_checkpoints=3; nothing for step 4
    assert ck.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000003"
    last = records(tmp_path)[-1]
    assert last["event"] == "error" and last["step"] == 4 and "nan" in last["error"]


def test_inf_loss_and_inf_gradient_are_caught(tmp_path: Path) -> None:
    def inf_loss(m: nn.Module, batch: Any) -> torch.Tensor:
        return mse(m, batch) + m[0].weight.pow(2).sum() * 1e38  # overflows float32

    def inf_grad(m: nn.Module, batch: Any) -> torch.Tensor:
        w = m[0].weight * 1.0
        w.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
        return mse(m, batch) + w.sum() * 0.0

    cfg = TrainConfig(steps=3, batch_size=16, ckpt_every=0)
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 1"):
        Trainer(mlp(), inf_loss, dataset(), cfg, tmp_path / "a", progress=False).fit()
    model = mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (inf|nan) at step 1"):
        Trainer(model, inf_grad, dataset(), cfg, tmp_path / "b", progress=False).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the bad update was not applied


def test_bf16_runs_forward_in_bf16_and_loss_in_fp32(tmp_path: Path) -> None:
    seen: dict[str, torch.dtype] = {}
    model = mlp()

    def record_inner(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        seen.setdefault("inner", out.dtype)

    model[0].register_forward_hook(record_inner)

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        pred = m(batch[0])
        seen.setdefault("output", pred.dtype)
        loss = (pred - batch[1]).pow(2).mean()
        seen.setdefault("loss", loss.dtype)
        return loss

    cfg = TrainConfig(steps=3, batch_size=16, precision="bf16", ckpt_every=0)
    Trainer(model, loss_fn, dataset(), cfg, tmp_path, progress=False).fit()
    assert seen == {"inner": torch.bfloat16, "output": torch.float32, "loss": torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_time_budget_stops_early_with_a_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=100_000, max_minutes=0.2 / 60, batch_size=16, ckpt_every=0, log_every=10**6)
    result = Trainer(mlp(), mse, dataset(), cfg, tmp_path, progress=False).fit()
    assert result.stopped == "time" and 0 < result.step < 100_000 and result.elapsed_s >= 0.2
    assert result.checkpoint == tmp_path / "checkpoints" / f"step_{result.step:08d}"
    assert records(tmp_path)[-1]["step"] == result.step  # the final step is always logged
    again = Trainer(mlp(), mse, dataset(), cfg, tmp_path, progress=False).fit(resume=True)
    assert again.stopped == "time" and again.step == result.step  # budget counts across resumes


def test_warm_start_copies_ema_weights_and_is_ignored_on_resume(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup_steps=0, ema_decay=0.5, ckpt_every=0)
    first = Trainer(mlp(), mse, dataset(), cfg, tmp_path / "a", progress=False)
    first.fit()
    ema = {k: v.clone() for k, v in first.ema_model.state_dict().items()}
    exported = ck.export_weights(tmp_path / "a", tmp_path / "a.safetensors")
    assert not torch.equal(ema["0.weight"], first.model.state_dict()["0.weight"])  # EMA differs from raw
    # lr 0 after warm start: the model must stay exactly the EMA weights of the first run (not the raw ones)
    warm = TrainConfig(steps=2, batch_size=16, lr=1e-12, warmup_steps=0, ckpt_every=0, init=str(exported))
    second = Trainer(mlp(), mse, dataset(), warm, tmp_path / "b", progress=False)
    second.fit()
    for k, v in ema.items():
        assert torch.allclose(second.model.state_dict()[k], v, atol=1e-9), k
    start = records(tmp_path / "b")[0]
    assert start["init"] == str(exported) and start["init_step"] == 8
    # a wrong architecture is refused with the file named; on resume the init file is not read again
    wide = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 1))
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"train.init=.*a.safetensors: its weights do not fit.*0.weight: file \[16, 3\]"):
        Trainer(wide, mse, dataset(), warm, tmp_path / "c", progress=False).fit()
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())  # not half-loaded: 2.bias fits
    gone = TrainConfig(steps=2, batch_size=16, ckpt_every=0, init=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match=r"train.init=.*nowhere.safetensors: checkpoint not found"):
        Trainer(mlp(), mse, dataset(), gone, tmp_path / "d", progress=False).fit()
    exported.unlink()
    more = TrainConfig(steps=4, batch_size=16, lr=1e-12, warmup_steps=0, ckpt_every=0, init=str(exported))
    assert Trainer(mlp(), mse, dataset(), more, tmp_path / "b", progress=False).fit(resume=True).step == 4


def test_eval_hook_gets_ema_and_leaves_training_rng_alone(tmp_path: Path) -> None:
    def noisy(m: nn.Module, batch: Any) -> torch.Tensor:
        x = batch[0] + 0.1 * torch.randn_like(batch[0]) + 0.01 * random.random() + 0.01 * float(np.random.rand())
        return (m(x) - batch[1]).pow(2).mean()

    calls: list[tuple[int, bool]] = []

    def eval_fn(m: nn.Module, step: int) -> dict[str, float]:
        calls.append((step, m.training))
        torch.randn(100), random.random(), np.random.rand()  # must not shift the training streams
        return {"mse": float(step)}

    finals = []
    for fn in (None, eval_fn):
        model = mlp()
        cfg = TrainConfig(steps=10, batch_size=16, eval_every=4, log_every=5, ckpt_every=0)
        trainer = Trainer(model, noisy, dataset(), cfg, tmp_path / str(fn is None), eval_fn=fn, progress=False)
        trainer.fit()
        finals.append(model.state_dict())
        assert calls == ([] if fn is None else [(4, False), (8, False), (10, False)])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    evals = {r["step"]: r["eval/mse"] for r in records(tmp_path / "False") if "eval/mse" in r}
    assert evals == {4: 4.0, 8: 8.0, 10: 10.0}


def test_data_order_is_seeded_per_epoch_and_resumable() -> None:
    n, batch, seed = 50, 8, 3
    single = _ShardedBatches(n, batch, DistEnv(), seed, epoch=0, index=0)
    it = iter(single)
    got = [next(it) for _ in range(2 * single.per_epoch)]
    for epoch in (0, 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        expect = [order[i * batch : (i + 1) * batch] for i in range(n // batch)]
        assert got[epoch * single.per_epoch : (epoch + 1) * single.per_epoch] == expect
    later = iter(_ShardedBatches(n, batch, DistEnv(), seed, epoch=1, index=2))
    assert next(later) == got[single.per_epoch + 2]


def test_progress_bar_and_config_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    cfg = TrainConfig(steps=4, batch_size=16, ckpt_every=0, log_every=2)
    result = Trainer(mlp(), mse, dataset(), cfg, tmp_path, progress=True).fit()
    assert result.step == 4 and math.isfinite(result.loss or math.nan)
    assert (tmp_path / "config.yaml").read_text().startswith("train:\n  steps: 4\n")
    with pytest.raises(ValueError, match="grad_accum must be >= 1, got 0; lr must be > 0"):
        TrainConfig(grad_accum=0, lr=0.0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(mlp(), mse, dataset(8), cfg, tmp_path / "small", progress=False).fit()
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        Trainer(mlp(), lambda m, b: m(b[0]), dataset(), cfg, tmp_path / "vec", progress=False).fit()


def test_resume_true_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=5, batch_size=16, ckpt_every=0)
    a, b = mlp(), mlp()
    Trainer(a, mse, dataset(), cfg, tmp_path / "a", progress=False).fit(resume=True)
    Trainer(b, mse, dataset(), cfg, tmp_path / "b", progress=False).fit()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# --- SIGINT / SIGTERM: stop after the step with a checkpoint ---------------------------------------------------------
def test_stop_signals_flag_then_abort_and_restore_handlers() -> None:
    import os
    import signal

    from multidiff.training import StopSignals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first signal only asks to stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C aborts at once
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert stop.signum == signal.SIGTERM


@pytest.mark.parametrize("sig,workers", [("SIGINT", 2), ("SIGTERM", 2), ("SIGTERM", 0)])
def test_signal_stops_training_with_a_checkpoint_and_resume_continues(tmp_path: Path, sig: str, workers: int) -> None:
    """`multidiff train` sent SIGINT (as a terminal's Ctrl-C: to the whole process group, DataLoader workers too) or
    SIGTERM (Slurm, kill -TERM -PGID) mid-run: it finishes the step, saves a checkpoint at that step (none would exist otherwise: ckpt_every is
    beyond the run), logs the event, exits 128 + signal; --resume goes on from there."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    env = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "multidiff.cli", "train", "toy", "train.steps=1000000", "train.ckpt_every=10000000",
            "train.log_every=10", f"train.num_workers={workers}", "--out", str(run), "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(line).get("step", 0) >= 30 for line in log.read_text().splitlines()[1:]):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig), err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped"] == "interrupted" and result["step"] >= 30
    assert Path(result["checkpoint"]).name == f"step_{result['step']:08d}"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1] == {"step": result["step"], "event": "interrupted", "signal": sig}
    assert "--resume" in err
    more = subprocess.run(args[:5] + [f"train.steps={result['step'] + 5}"] + args[6:] + ["--resume"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert more.returncode == 0, more.stderr
    resumed = json.loads(more.stdout.strip().splitlines()[-1])
    assert resumed["stopped"] == "steps" and resumed["step"] == result["step"] + 5
    starts = [json.loads(line) for line in log.read_text().splitlines() if '"resume"' in line]
    assert starts and starts[-1]["step"] == result["step"]


# --- train.compile ------------------------------------------------------------------------------------------------


class _WithTarget(nn.Module):
    """A model whose compile_target is its inner MLP (as TrainingModule names the denoiser's backbone)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    @property
    def compile_target(self) -> nn.Module:
        return self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_compile_trains_the_same_weights_through_inductor(tmp_path: Path) -> None:
    """train.compile runs the compile target through torch.compile (graphs are compiled) and, float rounding aside,
    learns what eager learns; the checkpoint's keys and the EMA copy are the eager module's."""
    import torch._dynamo

    from multidiff.training import compile_target

    finals = {}
    for flag in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = _WithTarget()
        plain = mlp()
        assert compile_target(model) is model.net and compile_target(plain) is plain
        cfg = TrainConfig(steps=6, batch_size=16, lr=1e-2, warmup_steps=0, ckpt_every=0, compile=flag)
        trainer = Trainer(model, mse, dataset(), cfg, tmp_path / str(flag), progress=False)
        trainer.fit()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == flag, graphs
        assert "forward" not in model.net.__dict__  # the compiled forward is gone after fit
        assert not any(r.get("event") == "compile_failed" for r in records(tmp_path / str(flag)))
        finals[flag] = model.state_dict()
        weights, _, _, _ = ck.load_weights(tmp_path / str(flag) / "checkpoints" / "step_00000006" / "model.safetensors")
        assert set(weights) == set(model.state_dict())  # no "_orig_mod." prefixes
    assert not torch.equal(finals[True]["net.0.weight"], _WithTarget().state_dict()["net.0.weight"])
    for k, v in finals[False].items():
        assert torch.allclose(finals[True][k], v, rtol=1e-4, atol=1e-5), k


def test_compile_falls_back_to_eager_once_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A compiler that fails (no C++ compiler, an unsupported op) leaves the run training eagerly, with one warning
    and a compile_failed record; an error eager raises too is the model's own and propagates."""
    import copy

    import multidiff.training as tr

    calls = {"compiled": 0}

    def broken_compile(fn: Any, **kwargs: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            calls["compiled"] += 1
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(tr.torch, "compile", broken_compile)
    model = _WithTarget()
    cfg = TrainConfig(steps=5, batch_size=16, lr=1e-2, warmup_steps=0, ckpt_every=0, log_every=1, compile=True)
    with caplog.at_level("WARNING", logger="multidiff.training"):
        result = Trainer(model, mse, dataset(), cfg, tmp_path / "a", progress=False).fit()
    assert result.step == 5 and calls["compiled"] == 1  # tried once, then eager
    warned = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert len(warned) == 1 and "InvalidCxxCompiler" in warned[0] and "training eager" in warned[0]
    events = [r for r in records(tmp_path / "a") if r.get("event") == "compile_failed"]
    assert len(events) == 1 and "no working C++ compiler" in events[0]["error"]
    assert events[0]["step"] == 1  # written when it happened, not at the end
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "a") if "loss" in r)

    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("batch 3: expected 3 features")

    bad = Bad()
    ema = copy.deepcopy(bad)  # made before: keeps the class forward
    with tr.compiled_forward(bad), pytest.raises(ValueError, match="expected 3 features"):
        assert "forward" in bad.__dict__ and "forward" not in ema.__dict__
        bad(torch.zeros(1))
    own = lambda x: x + 1  # noqa: E731  # an instance forward the module had before is restored afterwards
    bad.forward = own  # type: ignore[method-assign]
    with tr.compiled_forward(bad):
        assert bad.forward is not own
    assert bad.forward is own
