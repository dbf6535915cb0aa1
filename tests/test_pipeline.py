"""multidiff.pipeline directly, on a tiny toy model: load a run or an export, generate (CFG, guidance interval,
inpainting), per-sample seeds, chunking, writing files + metrics, and the errors for bad settings.

The CLI, the server and batch jobs all run these functions; tests/test_cli.py covers them end to end through the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from multidiff import pipeline
from multidiff.checkpoint import export_weights
from multidiff.registry import SampleRequest, get_domain
from multidiff.samplers import StepInfo, prior
from multidiff.schedules import make_grid
from multidiff.spaces import Euclidean

SMALL = ["train.steps=20", "train.ckpt_every=20", "data.num_train=512", "model.hidden=32", "model.layers=2",
         "train.batch_size=64", "train.warmup_steps=2", "sample.batch_size=4"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy run trained in-process for a few steps (quality is irrelevant: the checks below are exact)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dom = get_domain("toy")
        cfg = pipeline.load_run_config(dom, None, SMALL)
        run = tmp_path_factory.mktemp("toypipe") / "run"
        pipeline.train(dom, cfg, run, device="cpu", progress=False)
    finally:
        torch.set_num_threads(before)
    return run


@pytest.fixture(scope="module")
def model(toy_run: Path) -> pipeline.LoadedModel:
    return pipeline.load_model(toy_run)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def settings(model: pipeline.LoadedModel, **kw) -> pipeline.SamplerSettings:
    return pipeline.sampler_settings(model, **{"sampler": "euler", "steps": 4, **kw})


# --- loading -------------------------------------------------------------------------------------------------------


def test_load_model_from_a_run_and_from_its_export_agree(toy_run: Path, model: pipeline.LoadedModel, tmp_path: Path) -> None:
    assert model.domain.name == "toy" and model.step == 20
    assert model.cfg.model.hidden == 32 and model.cfg.sample.batch_size == 4
    assert not any(p.requires_grad for p in model.denoiser.parameters()) and not model.denoiser.training
    exported = pipeline.load_model(export_weights(toy_run, tmp_path / "toy.safetensors"))
    assert exported.step == 20 and exported.cfg == model.cfg
    ours, theirs = model.denoiser.state_dict(), exported.denoiser.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    s = settings(model)
    a = pipeline.generate_samples(model, 3, {"label": "2"}, s, seed=5)
    b = pipeline.generate_samples(exported, 3, {"label": "2"}, s, seed=5)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
    # the EMA weights are the default; the raw ones are a different model
    raw = pipeline.load_model(toy_run, prefer_ema=False)
    assert any(not torch.equal(ours[k], raw.denoiser.state_dict()[k]) for k in ours)


@pytest.mark.parametrize("dtype,bits", [("fp16", 11), ("bf16", 8)])
def test_half_precision_export_halves_the_file_and_rounds_each_weight_once(
        toy_run: Path, model: pipeline.LoadedModel, tmp_path: Path, dtype: str, bits: int) -> None:
    full = export_weights(toy_run, tmp_path / "full.safetensors")
    half = export_weights(toy_run, tmp_path / f"{dtype}.safetensors", dtype=dtype)
    tensor_bytes = sum(v.numel() * 4 for v in model.denoiser.state_dict().values())
    assert full.stat().st_size - half.stat().st_size == pytest.approx(tensor_bytes / 2, rel=0.02)
    loaded = pipeline.load_model(half)
    ours, theirs = model.denoiser.state_dict(), loaded.denoiser.state_dict()
    tiny = torch.finfo(torch.float16 if dtype == "fp16" else torch.bfloat16).smallest_normal * 2.0 ** -bits
    for k in ours:  # loaded back as fp32, each within half an ulp (round to nearest: rel. error <= 2^-p for normal
        assert theirs[k].dtype == torch.float32  # numbers, an absolute half-spacing below the smallest normal)
        err = (theirs[k] - ours[k]).abs()
        assert bool((err <= torch.clamp(ours[k].abs() * 2.0 ** -bits, min=tiny)).all()), k
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)  # it really was rounded
    s = settings(model)
    a = pipeline.generate_samples(model, 64, {"label": "2"}, s, seed=5)["x"]
    b = pipeline.generate_samples(loaded, 64, {"label": "2"}, s, seed=5)["x"]
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # same samples up to the rounding
    big = tmp_path / "big"
    with pytest.raises(ValueError, match=r"cannot store .* as torch.float16.*export it as fp32"):
        from multidiff.checkpoint import _cast_for_storage
        _cast_for_storage({"w": torch.tensor([1e6])}, torch.float16, big)
    with pytest.raises(ValueError, match="--dtype: expected one of fp32, fp16, bf16"):
        export_weights(toy_run, tmp_path / "x.safetensors", dtype="int8")


def test_load_model_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="nowhere"):
        pipeline.load_model(tmp_path / "nowhere")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="bad.safetensors"):
        pipeline.load_model(bad)


# --- generate: CFG, guidance interval, inpainting ---------------------------------------------------------------------


def _first_step(model: pipeline.LoadedModel, request: SampleRequest, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x_T, the denoised estimate the sampler used at the first step, t_0) of a ``generate`` call."""
    seen: list[StepInfo] = []
    pipeline.generate(model, request, sampler="euler", steps=4, generator=torch.Generator().manual_seed(seed),
                      callback=seen.append, **kw)
    ts = make_grid(model.denoiser.schedule, 4, "karras")
    x_T = prior(model.denoiser.schedule, ts[0], request.like, request.space, torch.Generator().manual_seed(seed),
                model.denoiser.kernel)
    assert seen[0].i == 0
    return x_T, seen[0].denoised, float(ts[0])


def test_generate_applies_classifier_free_guidance(model: pipeline.LoadedModel) -> None:
    """Ho & Salimans 2022: the guided estimate is D_u + w (D_c - D_u); the guidance interval (Kynkäänniemi et al.
    2024) leaves the conditional D_c outside (lo, hi]; guidance 1 is the conditional model."""
    den = model.denoiser
    request = model.domain.request(model.cfg, 6, {"label": "3"}, seed=0)
    w = 2.5
    x_T, guided, t0 = _first_step(model, request, 7, guidance=w)
    t = torch.full((6,), t0)
    d_c = den(x_T, t, request.cond)
    d_u = den(x_T, t, None)  # the toy backbone's null class
    assert not torch.allclose(d_c, d_u, atol=1e-4)  # the label matters, so the check below means something
    assert torch.allclose(guided, d_u + w * (d_c - d_u), atol=1e-5)
    _, outside, _ = _first_step(model, request, 7, guidance=w, guidance_interval=(0.0, t0 / 2))
    assert torch.allclose(outside, d_c, atol=1e-5)
    _, inside, _ = _first_step(model, request, 7, guidance=w, guidance_interval=(0.0, 1.0))
    assert torch.allclose(inside, guided, atol=1e-6)
    _, plain, _ = _first_step(model, request, 7)
    assert torch.allclose(plain, d_c, atol=1e-6)


def test_generate_inpaints_the_known_part_exactly(model: pipeline.LoadedModel) -> None:
    base = model.domain.request(model.cfg, 64, {"label": "1"}, seed=0)
    known = torch.zeros(64, 2)
    known[:, 0] = torch.linspace(-3, 3, 64)
    mask = torch.tensor([True, False]).expand(64, 2)
    request = SampleRequest(like=base.like, space=base.space, cond=base.cond, known=known, mask=mask, meta=base.meta)
    for sampler in ("euler", "ancestral", "dpmpp_2m"):
        x = pipeline.generate(model, request, sampler=sampler, steps=5, guidance=2.0,
                              generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(x).all()
        assert torch.equal(x[:, 0], known[:, 0]), sampler  # fixed exactly where mask is True
        assert float(x[:, 1].std()) > 0.05, sampler  # the free coordinate is sampled, not copied
    free = pipeline.generate(model, base, sampler="euler", steps=5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(free[:, 0], known[:, 0], atol=0.1)


def test_generate_is_deterministic_given_the_generator(model: pipeline.LoadedModel) -> None:
    request = model.domain.request(model.cfg, 8, {}, seed=0)
    run = lambda seed: pipeline.generate(model, request, sampler="ancestral", steps=5,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3)) and not torch.allclose(run(3), run(4))


# --- per-sample seeds, chunking ---------------------------------------------------------------------------------------


def test_sample_i_equals_sample_0_of_the_request_with_seed_plus_i(model: pipeline.LoadedModel) -> None:
    s = settings(model, sampler="ancestral")  # stochastic: every step draws from the sample's own stream
    for conditions in ({}, {"label": "5"}):  # {}: the label itself is drawn from the sample's seed
        many = pipeline.generate_samples(model, 5, conditions, s, seed=10, batch_size=1)
        for i in range(5):
            one = pipeline.generate_samples(model, 1, conditions, s, seed=10 + i, batch_size=1)
            assert torch.equal(many["x"][i], one["x"][0]) and torch.equal(many["label"][i], one["label"][0]), (conditions, i)
        # in batches the noise and labels are the same; only CPU rounding may differ with the batch size
        batched = pipeline.generate_samples(model, 5, conditions, s, seed=10, batch_size=3)
        assert torch.equal(batched["label"], many["label"])
        assert torch.allclose(batched["x"], many["x"], atol=1e-5)
    drawn = pipeline.generate_samples(model, 40, {}, s, seed=0)["label"]
    assert len(set(drawn.tolist())) > 3  # labels drawn per sample, not one for the request


def test_generate_batch_pads_to_a_fixed_size_bit_identically(model: pipeline.LoadedModel) -> None:
    """pad_to: a sample's result does not depend on its batch-mates at one fixed batch size."""
    s = settings(model, sampler="ancestral")
    reqs = pipeline.layout(model, 3, {"label": "4"}, seed=20)
    alone = pipeline.generate_batch(model, reqs[1:2], [21], s, pad_to=4)
    together = pipeline.generate_batch(model, reqs, [20, 21, 22], s, pad_to=4)
    assert len(together) == 3 and torch.equal(alone[0], together[1])


def test_chunks_follow_the_batch_size_and_report_progress(model: pipeline.LoadedModel) -> None:
    assert pipeline.num_sampler_calls(model, 10) == 3  # sample.batch_size=4
    assert pipeline.num_sampler_calls(model, 10, batch_size=5) == 2
    done: list[int] = []
    s = settings(model)
    pipeline.generate_samples(model, 10, {}, s, seed=0, callback=lambda info, d: done.append(d + info.i + 1))
    assert done == list(range(1, 3 * s.steps + 1))  # 3 calls x 4 steps, counted on


# --- writing --------------------------------------------------------------------------------------------------------


def test_sample_to_dir_writes_samples_and_strict_metrics(model: pipeline.LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    events: list[str] = []

    def before_write() -> None:
        events.append("before_write")
        assert not out.exists()  # the samples exist, nothing is written yet

    files, metrics = pipeline.sample_to_dir(model, 12, {"label": "6"}, settings(model), out, seed=3,
                                            before_write=before_write)
    assert events == ["before_write"]
    assert sorted(p.name for p in files) == ["metrics.json", "samples.csv", "samples.png"]
    assert all(p.is_file() and p.parent == out for p in files)
    rows = (out / "samples.csv").read_text().splitlines()
    assert rows[0] == "x,y,label" and len(rows) == 13 and all(r.endswith(",6") for r in rows[1:])
    on_disk = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert on_disk == pytest.approx(metrics) and metrics == pytest.approx(model.domain.evaluate(out, model.cfg))
    assert metrics["num_samples"] == 12 and 0 <= metrics["conditional_accuracy"] <= 1
    again = pipeline.generate_samples(model, 12, {"label": "6"}, settings(model), seed=3)
    assert torch.allclose(model.domain.read(out)["x"], again["x"].double(), atol=1e-5)  # the CSV holds these samples


def test_write_samples_without_evaluation_writes_no_metrics(model: pipeline.LoadedModel, tmp_path: Path) -> None:
    samples = pipeline.generate_samples(model, 4, {}, settings(model), seed=0)
    files, metrics = pipeline.write_samples(model, samples, tmp_path / "a" / "b", evaluate=False)
    assert metrics == {} and sorted(p.name for p in files) == ["samples.csv", "samples.png"]
    assert not (tmp_path / "a" / "b" / "metrics.json").exists()


# --- errors ----------------------------------------------------------------------------------------------------------


def test_sampler_settings_default_to_the_checkpoint_and_reject_bad_values(model: pipeline.LoadedModel) -> None:
    d = pipeline.sampler_settings(model)
    assert (d.sampler, d.steps, d.grid, d.guidance) == (model.cfg.sample.sampler, model.cfg.sample.steps,
                                                        model.cfg.sample.grid, float(model.cfg.sample.guidance))
    bad = [({"sampler": "nope"}, "sampler: unknown sampler 'nope'"), ({"grid": "cubic"}, "grid: unknown grid"),
           ({"steps": 0}, "steps: expected an integer >= 1"), ({"steps": True}, "steps: expected an integer"),
           ({"steps": 2.5}, "steps: expected an integer"), ({"guidance": math.nan}, "guidance: expected a finite"),
           ({"guidance": math.inf}, "guidance: expected a finite"),
           ({"gradient_scale": math.nan}, "gradient_scale: expected a finite")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            pipeline.sampler_settings(model, **kwargs)


def test_requests_and_batches_reject_bad_input(model: pipeline.LoadedModel, tmp_path: Path) -> None:
    s = settings(model)
    with pytest.raises(ValueError, match="num: expected >= 1"):
        pipeline.layout(model, 0, {})
    with pytest.raises(ValueError, match="label 99 out of range"):
        pipeline.generate_samples(model, 2, {"label": "99"}, s)
    with pytest.raises(ValueError, match="label must be an integer"):
        pipeline.sample_to_dir(model, 2, {"label": "x"}, s, tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing written for a bad request
    with pytest.raises(ValueError, match="unknown condition"):
        pipeline.layout(model, 2, {"colour": "red"})
    with pytest.raises(ValueError, match="inpainting is not supported"):
        pipeline.layout(model, 1, {}, inpaint=tmp_path / "x.csv")
    reqs = pipeline.layout(model, 2, {}, seed=0)
    with pytest.raises(ValueError, match=r"seeds: expected one per sample \(2\), got 1"):
        pipeline.generate_batch(model, reqs, [0], s)
    uncond = SampleRequest(like=torch.zeros(1, 2), space=Euclidean(), cond=None)
    with pytest.raises(ValueError, match="different condition keys"):
        pipeline.join_requests([reqs[0], uncond])
    with pytest.raises(ValueError, match="sampler|unknown"):
        pipeline.generate(model, reqs[0], sampler="nope", steps=3)
