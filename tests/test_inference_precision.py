"""Cheaper inference (``multidiff.inference``, ``multidiff sample --precision``): the bf16 and int8 paths run and stay
within a stated tolerance of fp32 on a fixed input; fallbacks are said once; bad settings are named."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from multidiff import inference, pipeline
from multidiff.diffusion import Denoiser
from multidiff.inference import PrecisionWarning, set_precision
from multidiff.toy import ToyMLP

AUDIO = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / "audio.safetensors"
# RMS(out - out_fp32) / RMS(out_fp32) allowed; measured: toy denoised 8.6e-4 (bf16) / 4.5e-3 (int8); shipped audio
# U-Net output F at t = 0.3 / 0.7: 5.1e-3 / 6.6e-3 (bf16), 2.6e-2 / 1.4e-2 (int8)
TOL = {"toy": {"bf16": 1e-2, "int8": 2e-2}, "audio": {"bf16": 2e-2, "int8": 6e-2}, "molecules": {"bf16": 0.25, "int8": 0.6}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def _toy() -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(ToyMLP(8), "cosine").eval()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_toy_denoiser_within_tolerance_of_fp32(precision: str, monkeypatch) -> None:
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)  # the arithmetic is checked on any CPU
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 2
    t = torch.full((256,), 0.5)
    den = _toy()
    assert set_precision(den, precision) == precision
    with torch.no_grad():
        assert _rel(den(x, t), _toy()(x, t)) < TOL["toy"][precision]
        assert den(x, t).dtype == torch.float32


@pytest.mark.skipif(not AUDIO.is_file(), reason="shipped audio checkpoint absent")
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_shipped_audio_network_within_tolerance_of_fp32(precision: str, monkeypatch) -> None:
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    loaded = pipeline.load_model(AUDIO)
    shape = loaded.domain.request(loaded.cfg, 2, {"label": "3"}).like.shape  # waveform [2, 1, T] or latent [2, C, L]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    cond = {"label": torch.tensor([3, 7])}
    ref, low = loaded.denoiser, pipeline.load_model(AUDIO).denoiser
    set_precision(low, precision)
    with torch.no_grad():
        for t in (0.3, 0.7):
            f_ref = ref._denoise(x, torch.tensor(t), cond, None)[1]
            assert _rel(low._denoise(x, torch.tensor(t), cond, None)[1], f_ref) < TOL["audio"][precision], t


def test_bf16_without_native_support_falls_back_to_fp32_saying_so_once(monkeypatch) -> None:
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(inference, "_said", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dens = [_toy(), _toy()]
        assert [set_precision(d, "bf16") for d in dens] == ["fp32", "fp32"]
    said = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(said) == 1 and "AVX-512 BF16" in str(said[0].message) and "fp32" in str(said[0].message)
    x, t = torch.randn(8, 2), torch.full((8,), 0.5)
    with torch.no_grad():
        assert torch.equal(dens[0](x, t), _toy()(x, t))


def test_bad_settings_are_named(monkeypatch) -> None:
    with pytest.raises(ValueError, match="--precision.*fp16"):
        set_precision(_toy(), "fp16")
    with pytest.raises(ValueError, match="int8.*CPU only"):
        set_precision(_toy(), "int8", "cuda")

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x, c_noise, cond=None):
            return self.conv(x)

    monkeypatch.setattr(inference, "_said", set())
    with pytest.warns(PrecisionWarning, match="no nn.Linear"):
        assert set_precision(Denoiser(Conv(), "cosine"), "int8") == "fp32"
    class Mlp(nn.Module):  # only linear layers: after quantization it has no nn.Parameter left
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, c_noise, cond=None):
            return self.lin(x)

    mlp = Denoiser(Mlp(), "cosine")
    set_precision(mlp, "int8")
    assert next(mlp.parameters()).device.type == "cpu"
    den = _toy()
    set_precision(den, "int8")
    with pytest.raises(ValueError, match="already runs in int8"):
        set_precision(den, "bf16")


def test_cli_sample_with_precision(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "multidiff.cli", *a], capture_output=True, text=True,  # noqa: E731
                                    env=env, timeout=600)
    p = run("train", "toy", "train.steps=20", "train.ckpt_every=20", "--out", str(tmp_path / "run"), "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("sample", "toy", "--checkpoint", str(tmp_path / "run"), "--num", "8", "--precision", "int8",
            "--out", str(tmp_path / "s"), "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["metrics"]["precision"] == "int8"
    p = run("sample", "toy", "--checkpoint", str(tmp_path / "run"), "--precision", "fp8", "--out", str(tmp_path / "b"))
    assert p.returncode != 0 and "--precision" in p.stderr and "fp8" in p.stderr


MOLECULES = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / "molecules.safetensors"


@pytest.mark.skipif(not MOLECULES.is_file(), reason="shipped molecules checkpoint absent")
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_shipped_molecules_network_within_tolerance_of_fp32(precision: str, monkeypatch) -> None:
    """The EGNN's fp32 coordinate head (kept out of bf16 autocast) also runs when int8 quantization has replaced its
    nn.Linear (whose ``weight`` is then a method). Measured rel. diff of the denoised rows (4 molecules, seed 3; the
    input is N(0, 1) rows, not a realistic x_t, so the network is off its data at t = 0.3) at t = 0.3 / 0.7: the
    flow / x0 / categorical model shipped in 69da1c2 bf16 0.117 / 5.2e-3, int8 0.30 / 3.6e-2 (the edm_poly / eps model
    before it: bf16 6.3e-3 / 1.3e-2, int8 5.0e-2 / 7.5e-2); the tolerance is about 2x the larger."""
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    ref, low = pipeline.load_model(MOLECULES), pipeline.load_model(MOLECULES)
    assert set_precision(low.denoiser, precision) == precision
    request = pipeline.layout(ref, 4, {}, seed=0)[0]
    x = torch.randn(request.like.shape, generator=torch.Generator().manual_seed(3))
    x = request.space.project(x)
    with torch.no_grad():
        for t in (0.3, 0.7):
            tt = torch.tensor(t)
            out_ref = ref.denoiser(x, tt, request.cond, space=request.space, **request.kwargs)
            out = low.denoiser(x, tt, request.cond, space=request.space, **request.kwargs)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert _rel(out, out_ref) < TOL["molecules"][precision], (t, _rel(out, out_ref))


def test_auto_is_the_domains_measured_choice_where_the_cpu_runs_it(monkeypatch) -> None:
    from multidiff.inference import resolve_precision
    from multidiff.registry import get_domain

    audio, molecules, toy = get_domain("audio"), get_domain("molecules"), get_domain("toy")
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", audio) == "bf16"  # measured 1.57x at equal quality (README)
    assert resolve_precision("auto", molecules) == "fp32" and resolve_precision("auto", toy) == "fp32"  # 0.76x
    assert resolve_precision("auto", audio, "cuda") == "fp32"  # only measured on CPU
    assert resolve_precision("int8", audio) == "int8" and resolve_precision("fp32", audio) == "fp32"
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto falls back silently: nothing was asked for
        assert resolve_precision("auto", audio) == "fp32"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("toy") / "run"
    env = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "multidiff.cli", "train", "toy", "train.steps=20", "train.ckpt_every=20",
                        "--out", str(run), "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return run


def _toy_prefers_bf16(monkeypatch) -> None:
    """The toy domain measured as audio is (its ``sample_precision`` bf16), on a CPU that runs bf16 natively."""
    from multidiff.toy import ToyDomain

    monkeypatch.setattr(ToyDomain, "sample_precision", "bf16", raising=False)
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)


def test_serve_resolves_precision_as_sample_does(toy_run: Path, monkeypatch) -> None:
    """``multidiff serve`` loads each model in the precision ``--precision`` resolves for its domain (auto: the
    domain's ``sample_precision``), not always fp32; the flag reaches the server and its answers say which."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from multidiff import serve
    from multidiff.training import _AutocastForward

    _toy_prefers_bf16(monkeypatch)
    model = serve.load_models({"toy": toy_run}, "cpu")["toy"]  # the default: auto
    assert model.denoiser.precision == "bf16" and isinstance(model.denoiser.backbone, _AutocastForward)
    assert serve.load_models({"toy": toy_run}, "cpu", "fp32")["toy"].denoiser.precision == "fp32"

    from serve_util import Server

    srv = Server("--checkpoint", f"toy={toy_run}", "--precision", "int8")  # int8: the same on any CPU
    try:
        assert httpx.get(f"{srv.url}/v1/domains").json()["toy"]["precision"] == "int8"
        r = httpx.post(f"{srv.url}/v1/toy/samples", json={"num": 2, "steps": 3, "metrics": False}, timeout=120)
        assert r.status_code == 200 and r.json()["precision"] == "int8", r.text
    finally:
        srv.stop()


def test_jobs_follow_the_precision_of_the_sample_command(toy_run: Path, tmp_path: Path, monkeypatch) -> None:
    """``multidiff sample --jobs`` samples in ``--precision`` resolved as for one ``multidiff sample`` (auto: the
    domain's choice) and records it in each job's manifest params; fp32 jobs record none (older manifests match)."""
    import json

    from typer.testing import CliRunner

    from multidiff.cli import app

    _toy_prefers_bf16(monkeypatch)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "a", "num": 2, "steps": 3}\n')

    def params(out: Path, *extra: str) -> dict:
        res = CliRunner().invoke(app, ["sample", "toy", "--checkpoint", str(toy_run), "--jobs", str(jobs),
                                       "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        return json.loads((out / "manifest.jsonl").read_text())["params"]

    assert params(tmp_path / "auto")["precision"] == "bf16"
    assert params(tmp_path / "int8", "--precision", "int8")["precision"] == "int8"
    assert "precision" not in params(tmp_path / "fp32", "--precision", "fp32")
