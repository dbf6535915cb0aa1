"""File helpers: the run-directory lock between real processes, strict JSON, the write probe."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from multidiff.files import LOCK_FILE, DirLock, DirLockedError, atomic_write, check_writable_dir, dumps_json, write_json
from multidiff.pipeline import write_metrics

ENV = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1", "COLUMNS": "80"}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multidiff.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _strict_loads(text: str) -> object:
    """json.loads that refuses NaN / Infinity (Python's json accepts them, other parsers do not)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _wait_for_lock(run: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until `proc` holds the run directory's lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = run / LOCK_FILE
        if lock.is_file() and lock.read_text().startswith(f"pid={proc.pid} "):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("the first process never took the lock")


def test_two_real_trainings_race_for_one_run_dir(tmp_path: Path) -> None:
    """The second `multidiff train` on a busy --out stops at once naming the holder's PID; a crash releases the lock."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "multidiff.cli", "train", "toy", "--out", str(run), "--steps",
                              "10000000", "--seed", "1", "--no-progress"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(run, first)
        t0 = time.monotonic()
        second = cli("train", "toy", "--out", str(run), "--steps", "5", "--seed", "2", "--no-progress")
        assert second.returncode != 0, second.stdout
        assert f"PID {first.pid}" in second.stderr and "in use" in second.stderr, second.stderr
        assert time.monotonic() - t0 < 120  # stops at once (the time is python + torch start-up)
        resumed = cli("train", "toy", "--out", str(run), "--steps", "5", "--resume", "--no-progress")
        assert resumed.returncode != 0 and f"PID {first.pid}" in resumed.stderr, resumed.stderr
        assert first.poll() is None  # the holder keeps training
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    with DirLock(run, "test"):  # killed with SIGKILL: the OS dropped its lock
        assert (run / LOCK_FILE).read_text().startswith(f"pid={os.getpid()} test")
    assert not (run / LOCK_FILE).exists()


def test_sample_into_a_locked_out_dir_stops_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from multidiff.files import DirLock; "
         f"DirLock({str(out)!r}, 'multidiff sample').acquire(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = cli("sample", "toy", "--checkpoint", str(tmp_path / "no-run"), "--out", str(out), "--no-progress")
        assert p.returncode != 0 and f"PID {holder.pid}" in p.stderr and "multidiff sample" in p.stderr, p.stderr
    finally:
        holder.communicate("")
    assert holder.returncode == 0


def test_dir_lock_in_one_process(tmp_path: Path) -> None:
    """A second lock object on the same directory fails (flock locks are per open file), release is idempotent."""
    a = DirLock(tmp_path, "a").acquire()
    with pytest.raises(DirLockedError, match=rf"PID {os.getpid()}, a since"):
        DirLock(tmp_path, "b").acquire()
    a.release()
    a.release()
    with DirLock(tmp_path, "b"):
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()


def test_strict_json_writes_null_for_nan_and_inf(tmp_path: Path) -> None:
    metrics = {"uniqueness": float("nan"), "fid": float("inf"), "ok": 0.5, "n": 3,
               "np": np.float32("nan"), "t": torch.tensor(float("-inf")), "list": [1.0, float("nan")],
               "arr": np.array([1.0, np.inf])}
    text = dumps_json(metrics)
    assert _strict_loads(text) == {"uniqueness": None, "fid": None, "ok": 0.5, "n": 3, "np": None, "t": None,
                                   "list": [1.0, None], "arr": [1.0, None]}
    for write in (write_json, lambda p, m: write_metrics(m, p)):
        path = write(tmp_path / "metrics.json", metrics)
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
        assert _strict_loads(path.read_text())["uniqueness"] is None
    with pytest.raises(TypeError):
        dumps_json({"x": object()})
    assert _strict_loads(dumps_json({"x": object()}, fallback=lambda o: "obj")) == {"x": "obj"}
    assert math.isnan(metrics["uniqueness"])  # the input is untouched


def test_write_probe_rejects_paths_that_cannot_hold_files(tmp_path: Path) -> None:
    assert check_writable_dir(tmp_path / "new" / "dir").is_dir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(PermissionError, match="a parent of it is a file"):
        check_writable_dir(a_file / "sub")
    with pytest.raises(PermissionError, match="not a directory"):
        check_writable_dir(a_file)
    assert not list(tmp_path.glob("new/dir/*"))  # the probe file is gone


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into directories without write permission")
def test_write_probe_rejects_a_directory_without_write_permission(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            check_writable_dir(ro)
    finally:
        ro.chmod(0o755)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    assert atomic_write(path, "old\n") == path and path.read_text() == "old\n"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)  # the permissions of a plain open
    atomic_write(path, b"\x00\x01", durable=False)
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda tmp: tmp.write_text("by a writer"), mode=0o600)
    assert path.read_text() == "by a writer" and (path.stat().st_mode & 0o777) == 0o600

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(path, broken)
    assert e.value.filename == str(path)  # the error names the file being written
    assert path.read_text() == "by a writer" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "plain.txt"]
