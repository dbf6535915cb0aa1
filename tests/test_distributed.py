"""torchrun on CPU (gloo): identical ranks, one writer, same result as one process with the same global batch."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multidiff import checkpoint as ck
from multidiff.distributed import DistEnv, dist_env
from multidiff.training import Trainer, _ShardedBatches

ROOT = Path(__file__).resolve().parents[1]

DDP_SCRIPT = r'''
import os, sys
import torch
from pathlib import Path
from torch import nn
from multidiff.training import TrainConfig, Trainer

def build():
    """Model, loss, data and config shared by the torchrun run and the single-process reference."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    def loss_fn(m, batch):  # deterministic, so ranks and the reference see the same numbers
        return (m(batch[0]) - batch[1]).pow(2).mean()
    cfg = TrainConfig(steps=20, batch_size=16, grad_accum=2, lr=1e-2, warmup_steps=3, ema_decay=0.9,
                      log_every=1, ckpt_every=10, keep_checkpoints=3, seed=11)
    return model, loss_fn, ds, cfg

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, dump = Path(sys.argv[1]), Path(sys.argv[2])
    model, loss_fn, ds, cfg = build()
    result = Trainer(model, loss_fn, ds, cfg, out, progress=False).fit()
    rank = os.environ["RANK"]
    assert torch.distributed.is_initialized() is False  # the trainer tears its process group down
    torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
                "log": None if result.log_path is None else str(result.log_path), "step": result.step},
               dump / f"rank{rank}.pt")
'''


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dist_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_env() == DistEnv(0, 0, 1) and dist_env().is_main and not dist_env().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = dist_env()
    assert env == DistEnv(3, 1, 4) and env.enabled and not env.is_main


def test_ranks_take_disjoint_slices_of_each_global_batch() -> None:
    n, batch, world = 70, 16, 2
    single = iter(_ShardedBatches(n, batch, DistEnv(), 9, 0, 0))
    ranks = [iter(_ShardedBatches(n, batch, DistEnv(r, r, world), 9, 0, 0)) for r in range(world)]
    for _ in range(10):  # crosses an epoch boundary (4 batches per epoch)
        whole = next(single)
        parts = [next(it) for it in ranks]
        assert all(len(p) == batch // world for p in parts) and sum(parts, []) == whole


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(out), str(dump)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile, the single-process reference with the same config (same global batch) in this process
    ns = runpy.run_path(str(script), run_name="reference")
    model, loss_fn, ds, cfg = ns["build"]()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, loss_fn, ds, cfg, tmp_path / "single", progress=False).fit()
    single = model.state_dict()

    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks disagree on {k}"

    # one writer: rank 0 reports the checkpoint and log, rank 1 nothing; exactly one set on disk
    assert r1["checkpoint"] is None and r1["log"] is None and r0["step"] == r1["step"] == 20
    assert r0["checkpoint"] == str(out / "checkpoints" / "step_00000020")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "log.jsonl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 21))
    assert [r.get("event") for r in recs if "event" in r] == ["start"] and recs[0]["world_size"] == 2
    saved = ck.load_checkpoint_for_sampling(out)
    assert all(torch.equal(saved.model_state[k], v) for k, v in r0["params"].items())

    # same global batch as the single process: only the order of float additions differs (per-rank means
    # averaged by all-reduce vs one mean over 16 samples), ~1e-7 relative per step; observed max |diff| is
    # ~5e-8 after 20 Adam steps. 1e-5 leaves 200x margin yet is ~1000x below the parameter movement, so a
    # wrong shard (duplicated or dropped samples) or unsynchronized gradients would fail it.
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if "loss" in r] == pytest.approx(
        [r["loss"] for r in single_log if "loss" in r], rel=1e-5)
    for k, v in single.items():
        assert (v - initial[k]).abs().max() > 1e-2 or k.endswith("bias")
        assert torch.allclose(r0["params"][k], v, rtol=0, atol=1e-5), (k, (r0["params"][k] - v).abs().max())
