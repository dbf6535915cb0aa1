"""The `multidiff` CLI end to end on the toy domain, and its errors for bad configs and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multidiff.cli", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("toy") / "run"
    last_json(cli("train", "toy", "train.steps=400", "train.ckpt_every=200", "--out", str(run), "--no-progress"))
    return run


def test_toy_train_sample_evaluate_beats_untrained(toy_run: Path, tmp_path: Path) -> None:
    out = last_json(cli("sample", "toy", "--checkpoint", str(toy_run), "--num", "2000", "--out", str(tmp_path / "s"), "--no-progress"))
    assert (tmp_path / "s" / "samples.csv").is_file() and (tmp_path / "s" / "samples.png").is_file()
    trained = last_json(cli("evaluate", "toy", str(tmp_path / "s")))
    assert trained == pytest.approx(out["metrics"])
    assert trained["conditional_accuracy"] > 0.9 and trained["sliced_wasserstein"] < 0.35

    untrained_run = tmp_path / "untrained"
    last_json(cli("train", "toy", "train.steps=1", "train.ckpt_every=1", "--out", str(untrained_run), "--no-progress"))
    cli("sample", "toy", "--checkpoint", str(untrained_run), "--num", "2000", "--out", str(tmp_path / "u"), "--no-progress")
    untrained = last_json(cli("evaluate", "toy", str(tmp_path / "u")))
    assert untrained["conditional_accuracy"] < 0.5 or untrained["sliced_wasserstein"] > 0.7


def test_conditional_sampling_and_seed(toy_run: Path, tmp_path: Path) -> None:
    a = last_json(cli("sample", "toy", "--checkpoint", str(toy_run), "--num", "500", "--condition", "label=3",
                      "--guidance", "2", "--seed", "4", "--out", str(tmp_path / "a"), "--no-progress"))
    assert a["metrics"]["conditional_accuracy"] > 0.95
    cli("sample", "toy", "--checkpoint", str(toy_run), "--num", "500", "--label", "3", "--guidance", "2", "--seed", "4",
        "--out", str(tmp_path / "b"), "--no-progress")
    assert (tmp_path / "a" / "samples.csv").read_text() == (tmp_path / "b" / "samples.csv").read_text()


def test_guidance_interval_override(toy_run: Path, tmp_path: Path) -> None:
    """sample.guidance_interval: covering every step equals plain CFG, covering none equals guidance 1."""
    base = ["sample", "toy", "--checkpoint", str(toy_run), "--num", "200", "--condition", "label=2", "--seed", "1",
            "--guidance", "3", "--no-progress"]

    def csv(name: str, *extra: str) -> str:
        last_json(cli(*base, *extra, "--out", str(tmp_path / name)))
        return (tmp_path / name / "samples.csv").read_text()

    guided, unguided = csv("g"), csv("u", "--guidance", "1")
    assert guided != unguided
    assert csv("all", "sample.guidance_interval=[0.0,1.0]") == guided
    assert csv("none", "sample.guidance_interval=[0.9999,1.0]") == unguided
    p = cli(*base, "sample.guidance_interval=[0.8,0.2]", "--out", str(tmp_path / "bad"))
    assert p.returncode != 0 and "sample.guidance_interval" in p.stderr


def test_sampling_in_chunks_of_sample_batch_size(toy_run: Path, tmp_path: Path) -> None:
    """--num larger than sample.batch_size is generated chunk by chunk and written as one set."""
    args = ["sample", "toy", "sample.batch_size=7", "--checkpoint", str(toy_run), "--num", "300", "--condition", "label=5",
            "--no-progress"]
    res = last_json(cli(*args, "--out", str(tmp_path / "a")))
    rows = (tmp_path / "a" / "samples.csv").read_text().splitlines()
    assert len(rows) == 301 and all(r.endswith(",5") for r in rows[1:])
    assert res["metrics"]["conditional_accuracy"] > 0.9
    last_json(cli(*args, "--out", str(tmp_path / "b")))
    assert (tmp_path / "b" / "samples.csv").read_text() == (tmp_path / "a" / "samples.csv").read_text()
    p = cli("sample", "toy", "train.lr=1", "--checkpoint", str(toy_run), "--out", str(tmp_path / "c"))
    assert p.returncode != 0 and "only data.* and sample.*" in " ".join(p.stderr.split())


def test_export_writes_one_inference_file_with_changed_sample_defaults(toy_run: Path, tmp_path: Path) -> None:
    from multidiff.checkpoint import load_weights
    from multidiff.pipeline import load_model

    out = tmp_path / "toy.safetensors"
    res = last_json(cli("export", str(toy_run), str(out), "sample.steps=7"))
    assert res["step"] == 400 and out.is_file()
    model_state, ema_state, config, meta = load_weights(out)
    assert ema_state is None and config["sample"]["steps"] == 7 and meta["weights"] == "ema"
    run = load_model(toy_run)
    shipped = load_model(out)
    assert shipped.cfg.sample.steps == 7 and shipped.step == 400
    for (k, a), (k2, b) in zip(run.denoiser.state_dict().items(), shipped.denoiser.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k  # the EMA weights the run samples with
    a = last_json(cli("sample", "toy", "--checkpoint", str(out), "--num", "50", "--out", str(tmp_path / "s"), "--no-progress"))
    assert a["metrics"]["conditional_accuracy"] > 0.8
    p = cli("export", str(toy_run), str(tmp_path / "x.pt"))
    assert p.returncode != 0 and ".safetensors" in p.stderr


def test_resume_continues_from_latest_checkpoint(toy_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(toy_run, run)
    res = last_json(cli("train", "toy", "train.steps=450", "train.ckpt_every=200", "--out", str(run), "--resume", "--no-progress"))
    assert res["step"] == 450
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 450


def test_bad_config_errors_name_key_and_file(tmp_path: Path) -> None:
    p = cli("train", "toy", "train.lrr=3e-4", "--out", str(tmp_path / "x"))
    assert p.returncode != 0 and "train.lrr" in p.stderr and "lr" in p.stderr
    p = cli("train", "toy", "train.steps=ten", "--out", str(tmp_path / "x"))
    assert p.returncode != 0 and "train.steps" in p.stderr and "int" in p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: toy\nmodel:\n  hiden: 64\n")
    p = cli("train", "toy", "--config", str(bad), "--out", str(tmp_path / "x"))
    assert p.returncode != 0 and "bad.yaml" in p.stderr and "model.hiden" in p.stderr and "hidden" in p.stderr
    p = cli("train", "toy", "--config", str(tmp_path / "nope.yaml"))
    assert p.returncode != 0 and "nope.yaml" in p.stderr and "not found" in p.stderr
    p = cli("train", "toy", "--config", "nosuchrecipe")
    assert p.returncode != 0 and "nosuchrecipe" in p.stderr and "default" in p.stderr
    p = cli("train", "sound")
    assert p.returncode != 0 and "unknown domain 'sound'" in p.stderr
    assert not (tmp_path / "x").exists()


def test_missing_and_corrupt_checkpoints(toy_run: Path, tmp_path: Path) -> None:
    p = cli("sample", "toy", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert p.returncode != 0 and "missing" in p.stderr and "not found" in p.stderr
    weights = sorted((toy_run / "checkpoints").glob("step_*/model.safetensors"))[-1]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(weights.read_bytes()[:100])
    p = cli("sample", "toy", "--checkpoint", str(broken), "--out", str(tmp_path / "o"))
    assert p.returncode != 0 and "broken.safetensors" in p.stderr
    assert weights.is_file()  # nothing earlier lost


def test_info_lists_domains_and_samplers() -> None:
    info = json.loads(cli("info").stdout)
    assert "toy" in info["domains"] and "dpmpp_2m" in info["samplers"] and "flow" in info["schedules"]


def test_evaluate_rejects_malformed_samples(tmp_path: Path) -> None:
    f = tmp_path / "samples.csv"
    f.write_text("x,y,label\n1.0,abc,2\n")
    p = cli("evaluate", "toy", str(f))
    assert p.returncode != 0 and "samples.csv:2" in p.stderr


def test_torchrun_two_processes_train_the_toy_domain(toy_run: Path, tmp_path: Path) -> None:
    """gloo on CPU: one checkpoint set and one log from rank 0; the model is as good as the 1-process run."""
    run = tmp_path / "ddp"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "multidiff.cli",
         "train", "toy", "train.steps=400", "train.ckpt_every=200", "--out", str(run), "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len([line for line in p.stdout.splitlines() if line.startswith("{")]) == 1  # only rank 0 reports
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step_00000200", "step_00000400"]
    assert len(list(run.glob("log*.jsonl"))) == 1
    metrics = {}
    for name, r in (("ddp", run), ("single", toy_run)):
        out = tmp_path / f"samples_{name}"  # not the run directory itself: sample refuses a non-empty --out
        last_json(cli("sample", "toy", "--checkpoint", str(r), "--num", "2000", "--out", str(out), "--no-progress"))
        metrics[name] = last_json(cli("evaluate", "toy", str(out)))
    assert metrics["ddp"]["conditional_accuracy"] > 0.9
    assert abs(metrics["ddp"]["sliced_wasserstein"] - metrics["single"]["sliced_wasserstein"]) < 0.15


def test_error_with_a_long_path_is_printed_on_one_line(tmp_path: Path) -> None:
    """rich must not wrap an error at the terminal width: a path copied from it has to work."""
    deep = tmp_path
    while len(str(deep)) < 220:
        deep = deep / "a_rather_long_directory_name"
    missing = deep / "missing_checkpoint_dir"
    p = subprocess.run([sys.executable, "-m", "multidiff.cli", "sample", "toy", "--checkpoint", str(missing),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env={**ENV, "COLUMNS": "80"},
                       timeout=600)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if str(missing) in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0], p.stderr


def test_sample_refuses_a_non_empty_out_unless_overwrite(toy_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["sample", "toy", "--checkpoint", str(toy_run), "--num", "20", "--no-progress", "--out", str(out)]
    first = last_json(cli(*args, "--seed", "1"))
    assert {Path(f).name for f in first["files"]} == {"samples.csv", "samples.png", "metrics.json"}
    from multidiff.toy import ToyDomain

    assert all(any(Path(f).match(pat) for pat in (*ToyDomain.output_patterns, "metrics.json")) for f in first["files"])
    before = (out / "samples.csv").read_text()
    p = cli(*args, "--seed", "2")
    assert p.returncode != 0 and "not empty" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert (out / "samples.csv").read_text() == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    last_json(cli(*args, "--seed", "2", "--overwrite"))
    assert (out / "samples.csv").read_text() != before and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".multidiff.lock").exists()


def test_overwrite_clears_the_domains_earlier_files_only(tmp_path: Path) -> None:
    """Audio: old WAVs must not survive next to new ones; files that are not the domain's stay."""
    from multidiff.cli import _earlier_outputs
    from multidiff.registry import get_domain

    names = ["sample_000_label1.wav", "sample_017_label3.wav", "labels.json", "spectrograms.png", "metrics.json",
             "clip.wav", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    earlier = {p.name for p in _earlier_outputs(get_domain("audio"), tmp_path, overwrite=True)}
    assert earlier == {"sample_000_label1.wav", "sample_017_label3.wav", "labels.json", "spectrograms.png", "metrics.json"}
    with pytest.raises(FileExistsError, match="not empty"):
        _earlier_outputs(get_domain("audio"), tmp_path, overwrite=False)
    mol = {p.name for p in _earlier_outputs(get_domain("molecules"), tmp_path, overwrite=True)}
    assert mol == {"metrics.json"}


def test_sample_checks_out_before_any_work(toy_run: Path, tmp_path: Path) -> None:
    """An --out that cannot hold files fails at once (not after sampling) and names the directory."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for bad in (a_file / "sub", a_file):
        p = cli("sample", "toy", "--checkpoint", str(toy_run), "--num", "20", "--out", str(bad), "--no-progress")
        assert p.returncode != 0 and f"--out {bad} is not writable" in p.stderr, p.stderr


def test_zero_sizes_stop_before_any_work(tmp_path: Path) -> None:
    for override in ("model.hidden=0", "model.layers=-1", "data.components=0", "data.num_train=0", "sample.steps=0"):
        p = cli("train", "toy", override, "--out", str(tmp_path / "x"), "--steps", "5", "--no-progress")
        assert p.returncode != 0 and f"command-line override '{override}'" in p.stderr and ">= 1" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()


def test_condition_errors_say_what_is_wrong(toy_run: Path, tmp_path: Path) -> None:
    base = ["sample", "toy", "--checkpoint", str(toy_run), "--num", "4", "--out", str(tmp_path / "o"), "--no-progress"]
    p = cli(*base, "--condition", "noequals")
    assert p.returncode != 0 and "--condition 'noequals' is malformed: expected KEY=VALUE" in p.stderr, p.stderr
    p = cli(*base, "--label", "3", "--condition", "label=4")
    assert p.returncode != 0 and "give the label once" in p.stderr, p.stderr
    p = cli("train", "toy", "train.lr=-1", "--out", str(tmp_path / "x"))
    assert p.returncode != 0 and "command-line override 'train.lr=-1'" in p.stderr and "lr must be > 0" in p.stderr
    assert "default.yaml" not in p.stderr


def test_exported_file_carries_a_verified_content_hash(toy_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "toy.safetensors"
    last_json(cli("export", str(toy_run), str(out)))
    data = bytearray(out.read_bytes())
    data[-5] ^= 0x10  # one bit of the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    p = cli("sample", "toy", "--checkpoint", str(bad), "--num", "4", "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode != 0 and f"{bad}: corrupted" in p.stderr, p.stderr
