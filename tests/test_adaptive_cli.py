"""The adaptive sampler's tolerance end to end on the toy domain: ``sample.rtol`` / ``sample.atol`` in the recipe,
``multidiff sample --rtol/--atol``, batch jobs and ``POST /v1/toy/samples`` (422 naming the field); other samplers
never receive a tolerance, and requests with different tolerances never share a sampler call."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from multidiff import pipeline
from tests.test_cli import cli, last_json

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("toy") / "run"
    last_json(cli("train", "toy", "train.steps=20", "train.ckpt_every=20", "--out", str(run), "--no-progress"))
    return run


def _nfe(toy_run: Path, out: Path, *args: str) -> int:
    res = last_json(cli("sample", "toy", *args, "--checkpoint", str(toy_run), "--num", "8", "--sampler", "adaptive",
                        "--out", str(out), "--no-progress"))
    recorded = json.loads((out / "metrics.json").read_text())["sampler_nfe"]
    assert res["metrics"]["sampler_nfe"] == recorded
    return recorded


def test_a_looser_tolerance_uses_fewer_nfe(toy_run: Path, tmp_path: Path) -> None:
    loose = _nfe(toy_run, tmp_path / "loose", "--rtol", "0.05", "--atol", "0.05")
    tight = _nfe(toy_run, tmp_path / "tight", "--rtol", "1e-4", "--atol", "1e-4")
    assert loose < tight, (loose, tight)
    # the recipe keys give the same sampler call as the flags
    assert _nfe(toy_run, tmp_path / "recipe", "sample.rtol=0.05", "sample.atol=0.05") == loose


def test_bad_tolerances_are_refused_naming_the_field(toy_run: Path, tmp_path: Path) -> None:
    base = ["sample", "toy", "--checkpoint", str(toy_run), "--num", "2", "--no-progress", "--out", str(tmp_path / "o")]
    cases = [
        (["--sampler", "adaptive", "--rtol", "-1"], ["--rtol", ">= 0", "-1"]),
        (["--sampler", "adaptive", "--rtol", "0", "--atol", "0"], ["--rtol", "--atol", "> 0"]),
        (["--sampler", "heun", "--rtol", "0.01"], ["--rtol", "--sampler adaptive only", "'heun'"]),
        (["--atol", "0.01"], ["--atol", "--sampler adaptive only", "'dpmpp_2m'"]),  # the checkpoint's sampler
        (["--sampler", "adaptive", "sample.rtol=-0.5"], ["sample.rtol", ">= 0"]),
        (["--sampler", "adaptive", "sample.rtol=0", "sample.atol=0"], ["sample.rtol", "sample.atol"]),
    ]
    for extra, words in cases:
        p = cli(*base, *extra)
        assert p.returncode == 2 and all(w in p.stderr for w in words), (extra, p.stderr[-1500:])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_settings_give_the_tolerance_to_the_adaptive_sampler_only(toy_run: Path, monkeypatch) -> None:
    model = pipeline.load_model(toy_run)
    st = pipeline.sampler_settings(model, sampler="adaptive", steps=5, rtol=0.02)
    assert (st.rtol, st.atol) == (0.02, model.cfg.sample.atol) and st.sampler_opts() == {"rtol": 0.02, "atol": 0.003}
    assert st != pipeline.sampler_settings(model, sampler="adaptive", steps=5, rtol=0.03)  # never batched together
    heun = pipeline.sampler_settings(model, sampler="heun", steps=3)
    assert heun.rtol is None and heun.atol is None and heun.sampler_opts() == {}
    for kw, field in (({"sampler": "heun", "rtol": 0.1}, "rtol"), ({"sampler": "adaptive", "atol": -1.0}, "atol"),
                      ({"sampler": "adaptive", "rtol": float("nan")}, "rtol")):
        with pytest.raises(ValueError, match=rf"^{field}: "):
            pipeline.sampler_settings(model, steps=3, **kw)

    seen: list[dict] = []
    real = pipeline.get_sampler

    def spy(name: str):
        fn = real(name)
        return lambda *a, **kw: (seen.append({"sampler": name, **kw}), fn(*a, **kw))[1]

    monkeypatch.setattr(pipeline, "get_sampler", spy)
    requests = pipeline.layout(model, 2, {}, seed=0)
    for settings in (st, heun):
        pipeline.generate_batch(model, requests, [0, 1], settings)
    assert seen[0]["sampler"] == "adaptive" and (seen[0]["rtol"], seen[0]["atol"]) == (0.02, 0.003)
    assert seen[1]["sampler"] == "heun" and "rtol" not in seen[1] and "atol" not in seen[1]


def test_jobs_take_a_tolerance_per_job(toy_run: Path, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "loose", "num": 2, "sampler": "adaptive", "rtol": 0.05, "atol": 0.05}\n'
                    '{"id": "default", "num": 2, "sampler": "adaptive"}\n'
                    '{"id": "fixed", "num": 2, "sampler": "heun", "steps": 3}\n')
    out = tmp_path / "out"
    p = cli("sample", "toy", "--checkpoint", str(toy_run), "--jobs", str(jobs), "--out", str(out), "--atol", "0.01")
    assert p.returncode == 2 and all(w in p.stderr for w in ("--atol", "job 'fixed' (line 3)", "'heun'", "per job")), p.stderr
    res = last_json(cli("sample", "toy", "--checkpoint", str(toy_run), "--jobs", str(jobs), "--out", str(out)))
    assert res["verified"] and res["ran"] == 3
    params = {json.loads(line)["id"]: json.loads(line)["params"] for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert (params["loose"]["rtol"], params["loose"]["atol"]) == (0.05, 0.05)
    assert (params["default"]["rtol"], params["default"]["atol"]) == (0.003, 0.003)  # the checkpoint's sample.rtol/atol
    assert "rtol" not in params["fixed"] and "atol" not in params["fixed"]
    jobs.write_text('{"id": "d", "num": 2, "sampler": "adaptive", "steps": 3}\n')
    res = last_json(cli("sample", "toy", "--checkpoint", str(toy_run), "--jobs", str(jobs), "--out", str(tmp_path / "o2"),
                        "--atol", "0.01"))
    d = json.loads((tmp_path / "o2" / "manifest.jsonl").read_text())["params"]
    assert (d["rtol"], d["atol"]) == (0.003, 0.01)  # --atol fills jobs without their own
    for line, words in (('{"id": "a", "sampler": "heun", "rtol": 0.1}', ["job 'a' (line 1)", "rtol", "'adaptive' only"]),
                        ('{"id": "b", "sampler": "adaptive", "atol": -1}', ["jobs.jsonl:1", "'atol'", ">= 0"]),
                        ('{"id": "c", "sampler": "adaptive", "rtol": "tight"}', ["jobs.jsonl:1", "'rtol'", "a number"])):
        jobs.write_text(line + "\n")
        p = cli("sample", "toy", "--checkpoint", str(toy_run), "--jobs", str(jobs), "--out", str(tmp_path / "bad"))
        assert p.returncode == 2 and all(w in p.stderr for w in words), (line, p.stderr[-1500:])


def test_server_takes_the_tolerance_and_never_batches_different_ones(toy_run: Path) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from serve_util import Server

    srv = Server("--checkpoint", f"toy={toy_run}", "--max-batch", "8", "--max-wait-ms", "1500")
    try:
        post = lambda body: httpx.post(f"{srv.url}/v1/toy/samples", json={"metrics": False, **body}, timeout=120)  # noqa: E731
        for body, field, words in (
            ({"sampler": "adaptive", "rtol": -1}, "rtol", "greater than or equal to 0"),
            ({"sampler": "adaptive", "atol": "inf"}, "atol", "finite"),
            ({"sampler": "adaptive", "rtol": 0, "atol": 0}, "rtol", "at least one"),
            ({"sampler": "heun", "rtol": 0.01}, "rtol", "adaptive"),
        ):
            r = post(body)
            assert r.status_code == 422, (body, r.text)
            detail = r.json()["detail"][0]
            assert detail["loc"][:2] == ["body", field] and words in detail["msg"], (body, detail)
        r = post({"sampler": "adaptive", "rtol": 0.05, "atol": 0.05, "num": 2})
        assert r.status_code == 200, r.text
        assert r.json()["settings"]["rtol"] == 0.05 and len(r.json()["samples"]) == 2
        assert httpx.get(f"{srv.url}/v1/domains").json()["toy"]["defaults"]["rtol"] == 0.003

        def calls_for(bodies: list[dict]) -> int:
            before = srv.metric("multidiff_batch_samples_count", 'domain="toy"')
            results: list = [None] * len(bodies)
            threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, post(bodies[k]))) for k in range(len(bodies))]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert all(x.status_code == 200 for x in results), [x.text for x in results]
            return int(srv.metric("multidiff_batch_samples_count", 'domain="toy"') - before)

        same = {"sampler": "adaptive", "rtol": 0.05, "atol": 0.05}
        assert calls_for([{**same, "seed": 1}, {**same, "seed": 2}]) == 1
        assert calls_for([{**same, "seed": 1}, {**same, "rtol": 0.02, "seed": 2}]) == 2
    finally:
        srv.stop()
