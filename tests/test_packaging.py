"""The install CI runs: exact torch/torchaudio pins, the install check of .ci/run, the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "check-install"


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for d in deps if (m := re.match(r"^(torch|torchaudio)(?![\w-])\s*(.*)$", d))}


def test_torch_and_torchaudio_are_pinned_exactly_and_documented() -> None:
    """torchaudio's binary is built for one torch: a wildcard let pip pair torch 2.11.0 with torchaudio 2.11.1."""
    pins = _pins()
    assert set(pins) == {"torch", "torchaudio"}
    for name, spec in pins.items():
        assert re.fullmatch(r"==\d+\.\d+\.\d+", spec), f"{name}{spec}: pin an exact version"
    readme = (ROOT / "README.md").read_text()
    assert f"torch {pins['torch'][2:]}" in readme and f"torchaudio {pins['torchaudio'][2:]}" in readme


def test_ci_runs_the_install_check_then_the_readmes_test_command() -> None:
    run = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme_test = next(line for line in (ROOT / "README.md").read_text().splitlines() if "exactly what CI runs" in line)
    readme_cmd = (ROOT / "README.md").read_text().split(readme_test, 1)[1].strip().splitlines()[0]
    install, _, test_cmd = readme_cmd.rpartition(" && ")
    assert run.replace(" -q", "") == f"{install} && bash .ci/check-install && {test_cmd}", run  # -q: quiet pip
    assert test_cmd == "python -m pytest"


def _stub(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    "python_body, pip_body, expect",
    [
        ('echo "ImportError: .../_torchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace" >&2; exit 1',
         "exit 0", "'import torch, torchaudio' fails (ImportError: .../_torchaudio.so: undefined symbol"),
        ("exit 0", 'echo "torchaudio 2.11.1 has requirement torch==2.11.1, but you have torch 2.11.0."; exit 1',
         "pip check reports 1 problem(s), first: torchaudio 2.11.1 has requirement torch==2.11.1"),
        ("exit 0", "exit 0", None),
    ],
    ids=["import-fails", "pip-check-fails", "ok"],
)
def test_install_check_fails_fast_with_one_line(tmp_path: Path, python_body: str, pip_body: str, expect: str | None) -> None:
    _stub(tmp_path, "python", python_body)
    _stub(tmp_path, "pip", pip_body)
    p = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}, timeout=60)
    if expect is None:
        assert p.returncode == 0 and p.stderr == "", p.stderr
    else:
        assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and expect in p.stderr, p.stderr


def test_install_check_passes_on_this_install() -> None:
    bindir = str(Path(sys.executable).parent)
    p = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
