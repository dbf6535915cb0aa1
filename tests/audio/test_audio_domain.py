"""The audio domain end to end: CLI train -> sample -> evaluate on a tiny folder dataset, CFG, inpainting, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from domains.audio.data import AudioDataError, AudioDataWarning, load_folder
from domains.audio.domain import AudioDomain, match_classes, parse_span
from domains.audio.synth import DIGIT_WORDS
from multidiff import pipeline
from multidiff.guidance import ClassifierFreeGuidance

ENV = {**os.environ, "MULTIDIFF_MALLOC": "system", "OMP_NUM_THREADS": "2"}
SR = 16000
# A tiny U-Net (total factor 16 * 4 * 5 = 320 divides 16,000) so the CLI run takes seconds.
TINY = ["model.channels=8", "model.blocks=[1,1,1]", "model.heads=2", "data.max_clips=32", "train.batch_size=8",
        "train.ckpt_every=4", "train.log_every=1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multidiff.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def of_samples(metrics: dict) -> dict:
    """A sample run's metrics without `precision`: how they were sampled (--precision auto: bf16 for audio on a CPU
    with native bf16), which `evaluate` of the files cannot know."""
    assert metrics.get("precision", "fp32") in ("fp32", "bf16")
    return {k: v for k, v in metrics.items() if k != "precision"}


def squash(text: str) -> str:
    """Text without whitespace (an error printer may wrap long lines)."""
    return "".join(text.split())


def _tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten label folders "0".."9" of short tones, 4 clips each (16-bit PCM at 16 kHz, one at 8 kHz)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for label in range(10):
        (root / str(label)).mkdir()
        for k in range(4):
            sr = 8000 if (label, k) == (0, 0) else SR
            x = _tone(200 + 60 * label, 0.5 + 0.1 * k, rng)
            if sr != SR:
                x = x[::2]
            sf.write(root / str(label) / f"clip{k}.wav", x, sr, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def run(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("audio") / "run"
    res = last_json(cli("train", "audio", "--config", "waveform", "data.source=folder", f"data.root={folder}",
                        "train.steps=4", *TINY, "--out", str(out), "--no-progress"))
    assert res["step"] == 4 and res["checkpoint"]
    return out


def test_cli_train_sample_evaluate(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = last_json(cli("sample", "audio", "--checkpoint", str(run), "--label", "7", "--num", "2", "--steps", "5",
                        "--out", str(out), "--no-progress"))
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == ["sample_000_label7.wav", "sample_001_label7.wav"]
    x, sr = sf.read(wavs[0])
    assert sr == SR and x.shape == (SR,) and np.isfinite(x).all()
    assert (out / "spectrograms.png").stat().st_size > 1000
    labels = json.loads((out / "labels.json").read_text())
    assert [r["label"] for r in labels["samples"]] == [7, 7] and labels["class_names"][7] == "7"
    assert json.loads((out / "metrics.json").read_text())["count"] == 2.0
    metrics = last_json(cli("evaluate", "audio", str(out), "--checkpoint", str(run)))
    assert metrics["count"] == 2.0 and metrics["duration_s"] == 1.0 and 0.0 <= metrics["peak"] <= 1.0
    numeric = {k: v for k, v in metrics.items() if isinstance(v, float)}
    assert numeric == pytest.approx({k: res["metrics"][k] for k in numeric})
    # No label: labels cycle through the classes, also across chunks of sample.batch_size.
    out2 = tmp_path / "cycle"
    last_json(cli("sample", "audio", "sample.batch_size=2", "--checkpoint", str(run), "--num", "3", "--steps", "2",
                  "--out", str(out2), "--no-progress"))
    assert [r["label"] for r in json.loads((out2 / "labels.json").read_text())["samples"]] == [0, 1, 2]
    assert len(list(out2.glob("*.wav"))) == 3


def test_bad_input_exits_nonzero(run: Path, tmp_path: Path) -> None:
    base = ["sample", "audio", "--checkpoint", str(run), "--num", "1", "--steps", "2", "--out", str(tmp_path / "x"), "--no-progress"]
    proc = cli(*base, "--label", "eleven")
    assert proc.returncode != 0 and "unknown label 'eleven'" in proc.stderr and "7=7" in proc.stderr
    clip = tmp_path / "in.wav"
    sf.write(clip, np.zeros(SR, dtype=np.float32) + 0.1, SR)
    proc = cli(*base, "--inpaint", str(clip), "--mask", "0.9:1.5")  # other bad spans: test_labels_and_spans
    assert proc.returncode != 0 and "ends after the clip" in proc.stderr, proc.stderr
    proc = cli(*base, "--inpaint", str(tmp_path / "missing.wav"), "--mask", "0.1:0.2")
    assert proc.returncode != 0 and "missing.wav" in proc.stderr and "not found" in proc.stderr
    assert not any((tmp_path / "x").glob("*.wav"))


def test_cfg_scale_one_is_plain_conditional(run: Path) -> None:
    model = pipeline.load_model(run)
    dom = model.domain
    req = dom.request(model.cfg, 3, {"label": "4"}, seed=0)
    plain = pipeline.generate(model, req, sampler="dpmpp_2m", steps=4, generator=torch.Generator().manual_seed(1))
    guided = pipeline.generate(model, req, sampler="dpmpp_2m", steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, guided)
    # The CFG wrapper itself at scale 1 is the conditional denoiser call, and a different scale changes the result.
    x, t = torch.randn(3, 1, SR), torch.tensor(0.5)
    den = lambda x, t, c: model.denoiser(x, t, c)  # noqa: E731
    assert torch.equal(ClassifierFreeGuidance(den, req.cond, 1.0)(x, t), den(x, t, req.cond))
    strong = pipeline.generate(model, req, sampler="dpmpp_2m", steps=4, guidance=3.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(plain, strong)


def test_inpainting_keeps_unmasked_audio_bit_exact(run: Path, folder: Path, tmp_path: Path) -> None:
    src = folder / "3" / "clip3.wav"  # 0.8 s of 16-bit PCM: zero-padded to 1 s
    out = tmp_path / "fill"
    last_json(cli("sample", "audio", "--checkpoint", str(run), "--inpaint", str(src), "--mask", "0.3:0.5", "--label", "3",
                  "--num", "2", "--steps", "4", "--out", str(out), "--no-progress"))
    original, _ = sf.read(src, dtype="int16")
    a, b = parse_span("0.3:0.5", 1.0, SR)
    assert (a, b) == (4800, 8000)
    for wav in sorted(out.glob("sample_*.wav")):
        x, sr = sf.read(wav, dtype="int16")
        expect = np.zeros(SR, dtype=np.int16)
        expect[: original.size] = original
        assert sf.info(str(wav)).subtype == "PCM_16"
        assert np.array_equal(x[:a], expect[:a]) and np.array_equal(x[b:], expect[b:])
        assert not np.array_equal(x[a:b], expect[a:b])  # the span was regenerated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inpaint_kept_max_abs_diff"] == 0.0

    # A float input at another rate: resampled, written as float WAV, kept part equal to the conditioning clip.
    model = pipeline.load_model(run)
    flt = tmp_path / "float8k.wav"
    sf.write(flt, (0.2 * np.sin(np.arange(8000) * 0.05)).astype(np.float32), 8000, subtype="FLOAT")
    req = model.domain.request(model.cfg, 2, {}, flt, "0.25:0.75")
    x = pipeline.generate(model, req, sampler="euler", steps=3, generator=torch.Generator().manual_seed(0))
    keep = req.mask
    assert torch.equal(x[keep], req.known[keep]) and not torch.equal(x[~keep], req.known[~keep])
    samples = model.domain.decode(x, req)
    model.domain.write(samples, tmp_path / "flt")
    back, _ = sf.read(tmp_path / "flt" / "sample_000_label0.wav", dtype="float32")
    assert sf.info(str(tmp_path / "flt" / "sample_000_label0.wav")).subtype == "FLOAT"
    assert torch.equal(torch.from_numpy(back)[keep[0, 0]], req.known[0, 0][keep[0, 0]])


def test_labels_and_spans() -> None:
    dom = AudioDomain()
    cfg = pipeline.load_run_config(dom, "waveform")
    assert dom.request(cfg, 2, {"label": "seven"}).cond["label"].tolist() == [7, 7]
    assert dom.request(cfg, 2, {"label": "7"}).cond["label"].tolist() == [7, 7]
    with pytest.raises(ValueError, match="valid labels"):
        dom.request(cfg, 2, {"label": "ten"})
    with pytest.raises(ValueError, match="needs --inpaint"):
        dom.request(cfg, 2, {}, None, "0.1:0.2")
    assert parse_span("0:1", 1.0, SR) == (0, SR)
    for bad in ["0.2:0.2", "-0.1:0.2", "0.1", "0.1:0.2:0.3", "0.99999:1.0"]:
        with pytest.raises(ValueError, match="--mask"):
            parse_span(bad, 1.0, SR)


def test_inpaint_wav_with_nan_or_inf_fails_naming_the_file(run: Path, tmp_path: Path) -> None:
    clip = np.full(SR, 0.1, dtype=np.float32)
    clip[1234] = np.nan
    bad = tmp_path / "nan_clip.wav"
    sf.write(bad, clip, SR, subtype="FLOAT")
    proc = cli("sample", "audio", "--checkpoint", str(run), "--inpaint", str(bad), "--mask", "0.3:0.5", "--num", "1",
               "--steps", "2", "--out", str(tmp_path / "o"), "--no-progress")
    err = squash(proc.stderr)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "FloatingPointError" not in proc.stderr
    assert squash(f"--inpaint {bad}: 1 of 16000 samples are NaN or infinite (the first at 0.0771 s, sample 1234)") in err
    assert not any((tmp_path / "o").glob("*.wav"))
    # inf too (it used to be clamped to full scale when the file was resampled), at another rate
    clip8k = np.full(8000, 0.1, dtype=np.float32)
    clip8k[10] = np.inf
    inf = tmp_path / "inf_clip.wav"
    sf.write(inf, clip8k, 8000, subtype="FLOAT")
    model = pipeline.load_model(run)
    with pytest.raises(ValueError, match=r"inf_clip\.wav: 1 of 8000 samples are NaN or infinite"):
        model.domain.request(model.cfg, 1, {}, inf, "0.3:0.5")
    # the data loader rejects the same files with the same words (one reader and check)
    folder = tmp_path / "set" / "x"
    folder.mkdir(parents=True)
    for f in (bad, inf):
        (folder / f.name).write_bytes(f.read_bytes())
    with pytest.warns(AudioDataWarning) as record, pytest.raises(AudioDataError, match="none usable"):
        load_folder(tmp_path / "set")
    assert sum("NaN or infinite" in str(w.message) for w in record) == 2


def test_inpaint_says_what_it_does_with_longer_and_shorter_files(run: Path, tmp_path: Path) -> None:
    model = pipeline.load_model(run)
    dom, cfg = model.domain, model.cfg
    rng = np.random.default_rng(1)
    long = tmp_path / "long.wav"
    x = _tone(300, 3.0, rng)
    sf.write(long, x, SR, subtype="FLOAT")
    with pytest.warns(AudioDataWarning, match=r"long\.wav is 3 s; the model's clip is 1 s: using the first 1 s"):
        req = dom.request(cfg, 1, {}, long, "0.2:0.4")
    assert torch.equal(req.known[0, 0], torch.from_numpy(x[:SR]))
    with pytest.warns(AudioDataWarning), pytest.raises(ValueError, match=r"ends after the clip \(clips are 1 s long\); "
                                                                           r".*long\.wav is 3 s long and only its first 1 s"):
        dom.request(cfg, 1, {}, long, "2:2.5")
    short = tmp_path / "short.wav"
    y = _tone(300, 0.5, rng)
    sf.write(short, y, SR, subtype="FLOAT")
    with pytest.warns(AudioDataWarning, match=r"short\.wav is 0\.5 s; the model's clip is 1 s: padded with silence "
                                              r"from 0\.5 s to 1 s"):
        req = dom.request(cfg, 1, {}, short, "0.4:0.6")  # partly in the padding: allowed
    assert torch.equal(req.known[0, 0, : SR // 2], torch.from_numpy(y)) and not req.known[0, 0, SR // 2:].any()
    with pytest.warns(AudioDataWarning), pytest.raises(
            ValueError, match=r"--mask '0\.6:0\.9': the span lies entirely in the silence padded after the end of "
                              r".*short\.wav, which is 0\.5 s long \(the model's clip is 1 s\)"):
        dom.request(cfg, 1, {}, short, "0.6:0.9")
    proc = cli("sample", "audio", "--checkpoint", str(run), "--inpaint", str(short), "--mask", "0.5:1", "--num", "1",
               "--steps", "2", "--out", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert squash("the span lies entirely in the silence padded after the end of") in squash(proc.stderr)
    assert squash("padded with silence from 0.5 s to 1 s") in squash(proc.stderr)  # the warning came first
    assert not any((tmp_path / "o").glob("*.wav"))


def test_judge_classes_are_matched_by_name() -> None:
    digits = list(DIGIT_WORDS)
    mapping, missing = match_classes(["seven", "0", " Two "], digits)
    assert mapping.tolist() == [7, 0, 2] and missing == []
    assert match_classes(["0", "1", "2", "ünï_lábel"], digits) == (None, ["ünï_lábel"])
    assert match_classes(["a"], None) == (None, ["a"])


def test_sample_and_evaluate_report_the_same_metrics(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = last_json(cli("sample", "audio", "--checkpoint", str(run), "--num", "4", "--steps", "2", "--out", str(out),
                        "--no-progress"))
    assert {"fid", "is", "cond_acc"} <= set(res["metrics"])  # folders "0".."9" are the judge's digits by name
    assert "folder" in res["metrics"]["reference"]
    # without --checkpoint (the default recipe is the spoken digits): the samples' labels.json says what they are;
    # `precision` says how they were sampled (--precision auto: bf16 on a CPU with native bf16), not a metric of them
    assert last_json(cli("evaluate", "audio", str(out))) == of_samples(res["metrics"])


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder model whose classes are not the judge's: 0, 1, 2 and ünï_lábel."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(2)
    for k, label in enumerate(["0", "1", "2", "ünï_lábel"]):
        (root / label).mkdir()
        for i in range(2):
            sf.write(root / label / f"c{i}.wav", _tone(250 + 80 * k, 0.6, rng), SR, subtype="PCM_16")
    out = tmp_path_factory.mktemp("odd_run") / "run"
    res = last_json(cli("train", "audio", "--config", "waveform", "data.source=folder", f"data.root={root}",
                        "train.steps=1", *TINY, "--out", str(out), "--no-progress"))
    assert res["step"] == 1
    return out


def test_judge_is_not_used_for_classes_it_does_not_know(odd_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    proc = cli("sample", "audio", "--checkpoint", str(odd_run), "--label", "ünï_lábel", "--num", "2", "--steps", "2",
               "--out", str(out), "--no-progress")
    res = last_json(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == res["metrics"]
    assert not {"cond_acc", "is", "mis", "fid", "am", "ndb_k", "ndb"} & set(metrics), metrics
    assert metrics["classifier_metrics"].startswith("unavailable: ") and "ünï_lábel" in metrics["classifier_metrics"]
    assert "AudioMetricsWarning" in proc.stderr and "ünï_lábel" in proc.stderr
    assert metrics["count"] == 2.0 and metrics["rms"] > 0.0  # the classifier-free statistics are still there
    again = cli("evaluate", "audio", str(out))
    assert last_json(again) == of_samples(metrics) and "AudioMetricsWarning" in again.stderr


def test_evaluate_names_bad_wavs_and_labels_json(tmp_path: Path) -> None:
    dom = AudioDomain()
    x = np.full(SR, 0.1, dtype=np.float32)
    x[5] = np.inf
    sf.write(tmp_path / "sample_000_label1.wav", x, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"sample_000_label1\.wav: 1 of 16000 samples are NaN or infinite"):
        dom.evaluate(tmp_path)
    (tmp_path / "labels.json").write_bytes(b"\xff\x00 not json")
    with pytest.raises(ValueError, match=r"labels\.json: not the JSON written by `multidiff sample audio`"):
        dom.evaluate(tmp_path)
