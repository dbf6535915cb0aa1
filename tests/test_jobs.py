"""Resumable batch jobs (`multidiff sample --jobs`): crash safety under SIGKILL, torchrun sharding, jobs-file errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multidiff.jobs import JobsError, read_jobs, read_manifest, verify_manifest

ENV = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
IDS = [f"j{k}" for k in range(6)]


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "multidiff.cli", *args]


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy checkpoint trained in-process for a few steps (quality is irrelevant here, only determinism)."""
    from multidiff import pipeline
    from multidiff.registry import get_domain

    dom = get_domain("toy")
    cfg = pipeline.load_run_config(dom, None, ["train.steps=5", "train.ckpt_every=5", "data.num_train=512",
                                               "model.hidden=32", "train.batch_size=64"])
    run = tmp_path_factory.mktemp("toyjobs") / "run"
    pipeline.train(dom, cfg, run, device="cpu", progress=False)
    return run


@pytest.fixture()
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.jsonl"
    lines = [json.dumps({"id": i, "num": 300, "label": k % 8, "steps": 40}) for k, i in enumerate(IDS)]
    path.write_text("# six jobs\n" + "\n".join(lines) + "\n")
    return path


def csv_digests(out: Path) -> dict[str, str]:
    return {r["id"]: next(f["sha256"] for f in r["files"] if f["path"].endswith("samples.csv"))
            for r in read_manifest(out).values()}


def assert_complete(out: Path) -> None:
    check = verify_manifest(out, IDS)
    assert check["ok"], check["problems"]
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(IDS)  # every job exactly once
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*IDS, "manifest.jsonl"])


def test_sigkill_at_any_moment_then_rerun_does_every_job_exactly_once(toy_ckpt: Path, jobs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = cli_args("sample", "toy", "--checkpoint", str(toy_ckpt), "--jobs", str(jobs_file), "--out", str(out))
    # 1) killed with the files of j1 written but not renamed; 2) killed after j2's rename, before its manifest line
    for point in ("written:j1", "renamed:j2"):
        p = subprocess.run(args, env={**ENV, "MULTIDIFF_JOBS_KILL_AT": point}, capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "j2").is_dir() and "j2" not in read_manifest(out)  # the crash left a renamed but uncommitted job
    # 3) kill -9 at random moments while jobs are being written
    rng = random.Random(15)
    for _ in range(2):
        before = len(read_manifest(out))
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if list(out.glob(".partial-*")) or len(read_manifest(out)) > before:
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    p = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["verified"] and summary["jobs"] == 6 and summary["skipped"] + summary["ran"] == 6
    assert_complete(out)
    digests = csv_digests(out)
    # the same command again finds everything done and changes nothing
    p = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert json.loads(p.stdout.strip().splitlines()[-1])["ran"] == 0 and csv_digests(out) == digests
    # the crashed-and-resumed samples are the ones an uninterrupted single process makes (seeds are per job)
    ref = tmp_path / "ref"
    subprocess.run(cli_args("sample", "toy", "--checkpoint", str(toy_ckpt), "--jobs", str(jobs_file), "--out", str(ref)),
                   env=ENV, check=True, capture_output=True, timeout=300)
    assert csv_digests(ref) == digests


def test_torchrun_shards_jobs_over_two_cpu_ranks_into_one_manifest(toy_ckpt: Path, jobs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "multidiff.cli",
         "sample", "toy", "--checkpoint", str(toy_ckpt), "--jobs", str(jobs_file), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    reports = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and json.loads(reports[0])["world_size"] == 2  # only rank 0 reports
    assert_complete(out)
    assert not list(out.glob(".manifest-rank*"))
    assert {r["rank"] for r in read_manifest(out).values()} == {0, 1}
    ids = [json.loads(x)["id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert ids == IDS  # merged in jobs-file order


def test_jobs_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "jobs.jsonl"
    cases = {
        '{"id": "a", "nmu": 3}': "unknown field(s) ['nmu']",
        '{"id": "../x"}': "field 'id'",
        '{"num": 0}': "field 'num': expected an integer >= 1",
        '{"num": true}': "field 'num'",
        '{"steps": "ten"}': "field 'steps'",
        '{"conditions": [1]}': "field 'conditions'",
        '[1, 2]': "expected a JSON object",
        '{"id": "a"': "not a JSON object",
    }
    for line, message in cases.items():
        f.write_text('{"id": "ok"}\n' + line + "\n")
        with pytest.raises(JobsError, match=None) as e:
            read_jobs(f)
        assert f"{f}:2" in str(e.value) and message in str(e.value), (line, str(e.value))
    f.write_text('{"id": "a"}\n\n{"id": "a"}\n')
    with pytest.raises(JobsError, match="line 1"):
        read_jobs(f)
    f.write_text('{"label": 3}\n{"label": 4, "seed": 9}\n')
    a, b = read_jobs(f, seed=5)
    assert (a.id, a.seed, a.conditions, b.seed) == ("job-000001", 5, {"label": "3"}, 9)


def test_a_torn_manifest_line_is_ignored_and_a_changed_job_is_refused(toy_ckpt: Path, tmp_path: Path) -> None:
    from multidiff import pipeline
    from multidiff.jobs import run_jobs

    model = pipeline.load_model(toy_ckpt)
    f = tmp_path / "jobs.jsonl"
    f.write_text('{"id": "a", "num": 5, "steps": 3}\n{"id": "b", "num": 5, "steps": 3}\n')
    out = tmp_path / "out"
    out.mkdir()
    run_jobs(model, read_jobs(f), out)
    text = (out / "manifest.jsonl").read_text()
    first, second = text.splitlines()
    (out / "manifest.jsonl").write_text(first + "\n" + second[: len(second) // 2])  # a write cut short by a crash
    assert set(read_manifest(out)) == {"a"}
    summary = run_jobs(model, read_jobs(f), out)
    assert summary["ran"] == 1 and summary["verified"]
    f.write_text('{"id": "a", "num": 6, "steps": 3}\n')
    with pytest.raises(JobsError, match="'a'.*other parameters"):
        run_jobs(model, read_jobs(f), out)
    (out / "b" / "samples.csv").write_text("tampered")
    assert any("sha256 differs" in p for p in verify_manifest(out)["problems"])
