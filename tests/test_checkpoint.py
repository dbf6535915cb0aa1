"""Checkpoints: safetensors + metadata, atomic layout, corruption detection and fallback, kill -9 bit-exact resume."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from multidiff import checkpoint as ck
from multidiff.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_setup(steps: int = 30) -> tuple[nn.Module, object, torch.utils.data.Dataset, TrainConfig]:
    """An MLP regression problem small enough to train in well under a second."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (m(batch[0]) - batch[1]).pow(2).mean()

    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=2, log_every=5, ckpt_every=10, ema_decay=0.9)
    return model, loss_fn, ds, cfg


def test_save_load_weights_round_trip(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    ck.save_weights(path, model, ema, {"train": {"lr": 0.1}}, {"step": 7, "note": "hi"})
    state, ema_state, config, meta = ck.load_weights(path)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert ema_state is not None and all(torch.equal(ema_state[k], v) for k, v in ema.items())
    assert config == {"train": {"lr": 0.1}} and meta["step"] == 7 and meta["note"] == "hi"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind
    ck.save_weights(path, model)  # without EMA
    assert ck.load_weights(path)[1] is None


def test_tied_weights_are_saved(tmp_path: Path) -> None:
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    ck.save_weights(tmp_path / "w.safetensors", model)
    state = ck.load_weights(tmp_path / "w.safetensors")[0]
    assert torch.equal(state["emb.weight"], state["head.weight"])


def _save(tmp_path: Path, step: int, keep: int = 0) -> Path:
    """Save a small checkpoint at `step`."""
    model = nn.Linear(3, 2)
    return ck.save_checkpoint(tmp_path, step, model, model, {"step": step, "t": torch.arange(3)}, {"a": 1}, keep=keep)


def test_atomic_layout_prune_and_verify(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        d = _save(tmp_path, step, keep=3)
        assert d.name == f"step_{step:08d}"
        assert sorted(p.name for p in d.iterdir()) == ["MANIFEST.json", "model.safetensors", "state.pt"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [20, 30, 40]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (20, 30, 40)]
    manifest = ck.verify_checkpoint(tmp_path / "checkpoints" / "step_00000040")
    assert manifest["step"] == 40 and set(manifest["files"]) == {"model.safetensors", "state.pt"}
    assert ck.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000040"
    state = ck.load_training_state(tmp_path / "checkpoints" / "step_00000040")
    assert state["step"] == 40 and torch.equal(state["t"], torch.arange(3))
    _save(tmp_path, 40)  # re-writing an existing step replaces it
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [20, 30, 40]
    assert ck.find_latest_checkpoint(tmp_path / "empty") is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or overwritten"),
        (lambda p: p.write_bytes(b"\xff" * 16 + p.read_bytes()[16:]), "sha256"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["truncated", "garbage-header", "deleted"],
)
def test_damaged_newest_is_skipped_with_warning(tmp_path: Path, damage: object, reason: str) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    damage(newest / "model.safetensors")  # type: ignore[operator]
    with pytest.warns(ck.CheckpointWarning, match=str(newest / "model.safetensors")) as rec:
        found = ck.find_latest_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_00000010"
    assert reason in str(rec[0].message)


def test_missing_manifest_means_incomplete_and_all_damaged_raises(tmp_path: Path) -> None:
    only = _save(tmp_path, 10)
    (only / "MANIFEST.json").unlink()
    with pytest.warns(ck.CheckpointWarning, match="MANIFEST.json: missing"):
        with pytest.raises(ck.CheckpointError, match="no usable checkpoint .* all 1 are damaged"):
            ck.find_latest_checkpoint(tmp_path)


def test_unmanifested_garbage_safetensors_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ck.CheckpointError, match=f"{bad}: not a readable safetensors file"):
        ck.load_checkpoint_for_sampling(bad)


def test_out_of_space_while_checkpointing_is_one_line_and_keeps_the_previous(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC in the middle of writing state.pt: one clear CheckpointError, the partial directory is gone, the previous
    checkpoint still verifies and is the one a resume picks."""
    out = tmp_path / "run"
    model, loss_fn, ds, cfg = tiny_setup(steps=20)
    real_write = ck._write_bytes

    def write(path: Path, data: bytes) -> None:
        if path.name == ck.STATE_FILE and "step_00000020" in str(path):
            with open(path, "wb") as f:
                f.write(bytes(data)[:10])  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(ck, "_write_bytes", write)
    with pytest.raises(ck.CheckpointError) as e:
        Trainer(model, loss_fn, ds, cfg, out, progress=False).fit()
    message = str(e.value)
    assert "\n" not in message and "no space left" in message and "step 20" in message, message
    assert str(out / "checkpoints" / "step_00000010") in message and "is intact" in message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000010"]  # no half-written .tmp-* left
    assert ck.find_latest_checkpoint(out) == out / "checkpoints" / "step_00000010"

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "_write_bytes", full_disk)
    with pytest.raises(ck.CheckpointError, match="no space left"):  # export: the same, and no file appears
        ck.export_weights(out, tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("*x.safetensors*"))


def test_exported_file_hash_catches_flipped_bits_and_old_files_still_load(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2))
    src = ck.save_checkpoint(tmp_path / "run", 5, model, model, {"step": 5}, {"domain": "x"})
    out = ck.export_weights(src, tmp_path / "export.safetensors")
    state, _, config, meta = ck.load_weights(out)
    assert config == {"domain": "x"} and len(meta[ck.CONTENT_HASH_KEY]) == 64
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    data = out.read_bytes()
    for pos in (len(data) - 1, len(data) - 40):  # tensor data sits after the header
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        bad = tmp_path / "flipped.safetensors"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ck.CheckpointError, match=rf"^{bad}: corrupted"):
            ck.load_weights(bad)
        with pytest.raises(ck.CheckpointError, match=rf"^{bad}: corrupted"):
            ck.load_checkpoint_for_sampling(bad)
    old = tmp_path / "old.safetensors"  # written without a hash, like the exports shipped before it existed
    ck.save_weights(old, model, None, {"domain": "x"})
    assert ck.CONTENT_HASH_KEY not in ck.load_weights(old)[3]


def test_load_for_sampling_accepts_run_dir_ckpt_dir_and_file(tmp_path: Path) -> None:
    model, loss_fn, ds, cfg = tiny_setup(steps=20)
    Trainer(model, loss_fn, ds, cfg, tmp_path / "run", run_config={"train": cfg, "model": {"w": 16}},
            progress=False).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000020"
    for target in (tmp_path / "run", tmp_path / "run" / "checkpoints", ckpt, ckpt / "model.safetensors"):
        loaded = ck.load_checkpoint_for_sampling(target)
        assert loaded.step == 20 and loaded.config["model"] == {"w": 16} and loaded.config["train"]["steps"] == 20
        assert loaded.ema_state is not None and loaded.weights() is loaded.ema_state
        assert all(torch.equal(loaded.model_state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ck.CheckpointNotFoundError, match=f"checkpoint not found: {tmp_path / 'nope'}"):
        ck.load_checkpoint_for_sampling(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointNotFoundError, match="no checkpoint in"):
        ck.load_checkpoint_for_sampling(tmp_path / "empty")


def test_resume_skips_truncated_checkpoint_and_missing_path_errors(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model, loss_fn, ds, cfg = tiny_setup(steps=30)
    Trainer(model, loss_fn, ds, cfg, out, progress=False).fit()
    newest = out / "checkpoints" / "step_00000030" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    model, loss_fn, ds, cfg = tiny_setup(steps=30)
    with pytest.warns(ck.CheckpointWarning, match=str(newest)):
        result = Trainer(model, loss_fn, ds, cfg, out, progress=False).fit(resume=True)
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed[-1]["checkpoint"] == str(out / "checkpoints" / "step_00000020") and resumed[-1]["step"] == 20
    assert result.step == 30 and ck.verify_checkpoint(out / "checkpoints" / "step_00000030")
    assert (out / "checkpoints" / "step_00000030.stale").is_dir()  # the damaged one is set aside, not deleted
    assert [e["step"] for e in events if "loss" in e] == [5, 10, 15, 20, 25, 30]  # no duplicated log lines

    with pytest.raises(ck.CheckpointNotFoundError, match=f"not found: {tmp_path / 'missing'}"):
        Trainer(*tiny_setup(), tmp_path / "other", progress=False).fit(resume=tmp_path / "missing")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        Trainer(*tiny_setup(), out, progress=False).fit(resume=False)
    bad = out / "checkpoints" / "step_00000020" / "state.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(ck.CheckpointError, match=str(bad)):  # an explicitly named checkpoint never falls back
        Trainer(*tiny_setup(), tmp_path / "other", progress=False).fit(resume=bad.parent)


# --- kill -9 at random moments, resume, and end bit-identical to an uninterrupted run -------------------------------

KILL_SCRIPT = r'''
import random, sys, time
import numpy as np
import torch
from pathlib import Path
from torch import nn
import multidiff.checkpoint as ck
from multidiff.training import TrainConfig, Trainer

out, resume, delay = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(123)
x = torch.randn(80, 4, generator=g)
ds = torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))

def loss_fn(m, batch):
    time.sleep(delay)  # widens the window in which a kill lands mid-training
    xb, yb = batch
    # noise from all three global RNGs, so resuming must restore each of them
    xb = xb + 0.05 * torch.randn_like(xb) * (1 + random.random()) * (1 + float(np.random.rand()))
    return (m(xb) - yb).pow(2).mean()

_save_weights = ck.save_weights
def slow_save_weights(path, *args, **kwargs):
    _save_weights(path, *args, **kwargs)
    if "00000020" in path.parent.name:
        time.sleep(delay * 60)  # hold a half-written checkpoint (weights written, no state/manifest) open
ck.save_weights = slow_save_weights

cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, ema_decay=0.9, grad_accum=2,
                  log_every=1, ckpt_every=10, keep_checkpoints=3, seed=7)
print("ready", flush=True)
Trainer(model, loss_fn, ds, cfg, out, progress=False).fit(resume=resume)
print("done", flush=True)
'''


def _env() -> dict[str, str]:
    """Subprocess environment: this checkout first on the path, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _steps_logged_since_start(log_path: Path) -> int:
    """Highest step logged by the current process (records after its start/resume event), -1 if none yet."""
    if not log_path.exists():
        return -1
    best, started = -1, False
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" in rec:
            started, best = True, -1
        elif started and "loss" in rec:
            best = max(best, rec["step"])
    return best


def _check_all_complete(out: Path) -> list[int]:
    """Every step_* dir verifies and loads; returns their steps."""
    steps = []
    for step, d in ck.list_checkpoints(out):
        ck.verify_checkpoint(d)
        state, ema, config, meta = ck.load_weights(d / "model.safetensors")
        assert ema is not None and meta["step"] == step and config["train"]["steps"] == 60
        assert ck.load_training_state(d)["step"] == step
        steps.append(step)
    return steps


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Model and EMA tensors of the step-60 checkpoint."""
    state, ema, _, _ = ck.load_weights(out / "checkpoints" / "step_00000060" / "model.safetensors")
    assert ema is not None
    return {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def test_kill9_at_random_moments_then_resume_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "train_kill.py"
    script.write_text(KILL_SCRIPT)
    seed = int(os.environ.get("KILL_TEST_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    delay = 0.008

    ref = tmp_path / "ref"  # the uninterrupted run, in parallel with the interrupted ones
    ref_proc = subprocess.Popen([sys.executable, str(script), str(ref), "0", "0"], env=_env(),
                                stdout=subprocess.DEVNULL)

    try:
        out = tmp_path / "killed"
        # three kills: at a random moment after a random step in 3..17, inside the (held-open) write of the step-20
        # checkpoint, and at a random moment after a random step in 33..50 (the run ends at 60)
        plan = [("step", rng.randint(3, 17)), ("ckpt20", 20), ("step", rng.randint(33, 50))]
        mid_write_seen = False
        for i, (kind, target) in enumerate(plan + [("finish", 0)]):
            proc = subprocess.Popen([sys.executable, str(script), str(out), "0" if i == 0 else "1", str(delay)],
                                    env=_env(), stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                if kind == "finish":
                    assert proc.wait(timeout=120) == 0
                    break
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if kind == "step" and _steps_logged_since_start(out / "log.jsonl") >= target:
                        time.sleep(rng.uniform(0, 3 * delay))
                        break
                    if kind == "ckpt20" and any(p.name.startswith(".tmp-step_00000020")
                                                for p in (out / "checkpoints").glob(".tmp-*")):
                        time.sleep(rng.uniform(0, 5 * delay))
                        break
                    assert proc.poll() is None, f"training finished before kill {i} (seed {seed})"
                    time.sleep(0.002)
                else:
                    pytest.fail(f"kill {i} never triggered (seed {seed})")
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            ckdir = out / "checkpoints"
            mid_write_seen |= ckdir.is_dir() and any(p.name.startswith(".tmp-") for p in ckdir.iterdir())
            steps = _check_all_complete(out)  # never a half-written step_* directory
            assert len(steps) <= 3, steps

        assert ref_proc.wait(timeout=120) == 0
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    assert mid_write_seen, f"no kill landed inside a checkpoint write (seed {seed})"
    assert _check_all_complete(out) == [40, 50, 60]
    a, b = _final_tensors(ref), _final_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill/resume (seed {seed})"
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == list(range(1, 61))  # the log was cut back to each resumed checkpoint: no duplicates
