"""``multidiff serve`` end to end: a real server on 127.0.0.1 serving the shipped audio and molecules checkpoints,
plus the pieces of the one generate path it stands on (per-sample noise, joined requests)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import signal
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sf = pytest.importorskip("soundfile")

from multidiff import pipeline  # noqa: E402
from multidiff.spaces import Euclidean, Graph, Masked, Product, ZeroCoM  # noqa: E402
from serve_util import ROOT, Server  # noqa: E402

SHIPPED = ROOT / "data" / "checkpoints"
pytestmark = pytest.mark.skipif(not (SHIPPED / "audio.safetensors").is_file() or not (SHIPPED / "molecules.safetensors").is_file(),
                                reason="shipped checkpoints not present")
FAST = {"steps": 2, "metrics": False}


# --- the generate path under the server ----------------------------------------------------------------------------
@pytest.mark.parametrize("space,like", [
    (Euclidean(), torch.zeros(3, 2, 5)),
    (ZeroCoM(torch.tensor([0, 0, 1, 1, 1, 2, 2])), torch.zeros(7, 3)),
    (Masked(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)), torch.zeros(3, 3, 2)),
    (Product([(slice(0, 3), ZeroCoM(torch.tensor([0, 1, 1, 2, 2]))), (slice(3, 5), Graph(torch.tensor([0, 1, 1, 2, 2])))]),
     torch.zeros(5, 5)),
])
def test_per_sample_generators_make_noise_independent_of_batch_mates(space, like) -> None:
    """Sample 1's noise depends only on its own generator; one generator for the batch still works as before."""
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    a = space.randn_like(like, gens([1, 2, 3]))
    b = space.randn_like(like, gens([7, 2, 9]))
    rows = (space.batch == 1) if hasattr(space, "batch") and space.batch is not None else torch.arange(like.shape[0]) == 1
    assert torch.equal(a[rows], b[rows])
    assert not torch.equal(a[~rows], b[~rows])
    assert torch.allclose(space.project(a), a, atol=1e-6)  # noise stays in the space
    same = space.randn_like(like, torch.Generator().manual_seed(0))
    assert torch.equal(same, space.randn_like(like, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="one generator per sample"):
        space.randn_like(like, gens([1, 2]))


@pytest.fixture(scope="module")
def models() -> dict[str, pipeline.LoadedModel]:
    return {d: pipeline.load_model(SHIPPED / f"{d}.safetensors") for d in ("audio", "molecules")}


def test_generate_batch_alone_equals_batched_and_padded(models, one_thread) -> None:
    """A sample in a batch (any position, any batch-mates) equals it alone: bit-for-bit at one padded batch size,
    to float rounding otherwise; layouts (audio labels, molecule sizes) come from each sample's own seed."""
    m = models["audio"]
    st = pipeline.sampler_settings(m, steps=2)
    a = pipeline.layout(m, 1, {"label": "3"}, seed=5)
    others = pipeline.layout(m, 3, {}, seed=100)
    alone = pipeline.generate_batch(m, a, [5], st, pad_to=4)[0]
    for pos in (0, 2, 3):
        reqs = others[:pos] + a + others[pos:]
        seeds = [100, 101, 102][:pos] + [5] + [100, 101, 102][pos:]
        assert torch.equal(pipeline.generate_batch(m, reqs, seeds, st, pad_to=4)[pos], alone)
    unpadded = pipeline.generate_batch(m, others[:2] + a, [100, 101, 5], st)[2]
    assert torch.allclose(unpadded, alone, atol=1e-4)

    mol = models["molecules"]
    st = pipeline.sampler_settings(mol, steps=3)
    one = pipeline.layout(mol, 1, {}, seed=8)
    crowd = pipeline.layout(mol, 3, {"n": "12"}, seed=0)
    x1 = pipeline.generate_batch(mol, one, [8], st)[0]
    x2 = pipeline.generate_batch(mol, crowd + one, [0, 1, 2, 8], st)[3]
    assert x1.shape == x2.shape and torch.allclose(x1, x2, atol=1e-3)
    assert [int(r.meta["sizes"]) for r in pipeline.layout(mol, 3, {}, seed=8)][0] == int(one[0].meta["sizes"])


def test_join_requests_offsets_graphs_and_keeps_conditions(models) -> None:
    mol = models["molecules"]
    reqs = pipeline.layout(mol, 3, {}, seed=1)
    joined = pipeline.join_requests(reqs)
    sizes = [int(r.meta["sizes"]) for r in reqs]
    assert joined.like.shape[0] == sum(sizes) and joined.space.num_samples == 3
    assert torch.equal(joined.kwargs["batch"], torch.repeat_interleave(torch.arange(3), torch.tensor(sizes)))
    assert torch.equal(joined.space.batch, joined.kwargs["batch"])
    audio = models["audio"]
    joined = pipeline.join_requests(pipeline.layout(audio, 2, {"label": "4"}, seed=0) + pipeline.layout(audio, 1, {}, seed=7))
    assert joined.cond["label"].tolist() == [4, 4, 7]


@pytest.mark.parametrize("wait_from", ["idle", "arrival"])
def test_batch_window_counts_from_when_the_worker_is_free(wait_from: str) -> None:
    """B has waited longer than max_wait when the worker becomes free; C arrives 0.1 s later (a client that was just
    answered). Counting from arrival, B starts at once, alone (the alternating half-full cohorts of a loaded server);
    counting from the moment the worker is free, B waits for C. A job that may not share a call never waits."""
    from types import SimpleNamespace

    from multidiff.serve import Batcher, Job, Metrics, ServeConfig

    class Idle(Batcher):
        def _run(self) -> None:  # no worker: the test takes the calls itself
            return

    def job(alone: bool = False) -> Job:
        return Job("toy", None, ("euler", 2), [SimpleNamespace(cond=None, known=None, kwargs={})], [0], loop=None,
                   alone=alone)

    batcher = Idle(ServeConfig(max_batch=4, max_wait_ms=1500, wait_from=wait_from), Metrics())
    b, c = job(), job()
    b.enqueued -= 2.0  # arrived while the previous call ran
    batcher.submit(b)
    batcher._free_since = time.monotonic()  # that call just ended
    timer = threading.Timer(0.1, batcher.submit, args=(c,))
    timer.start()
    t0 = time.monotonic()
    taken = batcher._take()
    waited = time.monotonic() - t0
    timer.join()
    if wait_from == "idle":
        assert [j for j, _ in taken] == [b, c] and 0.1 <= waited < 1.6  # B waited the window for C (max_batch unmet)
    else:
        assert [j for j, _ in taken] == [b] and waited < 0.1
        assert [j for j, _ in batcher._take()] == [c]  # C then waits out its own window alone
    lone = job(alone=True)
    batcher._free_since = time.monotonic()
    batcher.submit(lone)
    t0 = time.monotonic()
    assert [j for j, _ in batcher._take()] == [lone] and time.monotonic() - t0 < 0.5
    batcher.stop(5)


# --- a real server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    srv = Server("--max-batch", "4", "--max-wait-ms", "500", "--max-queue", "8", "--max-num", "8", "--exact",
                 "--max-upload-mb", "0.1")
    yield srv
    srv.stop()


def post(server: Server, domain: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{domain}/samples", json=body, timeout=300, **kw)


def files_of(sample: dict) -> dict[str, dict]:
    return {f["name"].rsplit(".", 1)[-1] if not f["name"].endswith("labels.json") else "labels": f for f in sample["files"]}


def test_health_domains_page(server) -> None:
    assert httpx.get(server.url + "/healthz").json()["domains"] == ["audio", "molecules"]
    info = httpx.get(server.url + "/v1/domains").json()
    assert info["audio"]["labels"][7] == "seven" and info["molecules"]["defaults"]["sampler"] == "heun"
    from multidiff.inference import resolve_precision
    from multidiff.registry import get_domain

    # --precision auto (the default), resolved per domain as `multidiff sample` does: audio bf16 on a CPU running it
    assert {d: info[d]["precision"] for d in info} == {d: resolve_precision("auto", get_domain(d)) for d in info}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>multidiff</title>" in page.text
    assert 'src="http' not in page.text and 'href="http' not in page.text and "@import" not in page.text  # no CDN


def test_audio_samples(server) -> None:
    r = post(server, "audio", {"num": 2, "label": "seven", "seed": 3, "figures": "inline", **FAST})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 3 and out["settings"]["steps"] == 2 and [s["seed"] for s in out["samples"]] == [3, 4]
    for s in out["samples"]:
        f = files_of(s)
        wave, sr = sf.read(io.BytesIO(base64.b64decode(f["wav"]["base64"])))
        assert sr == 16000 and wave.shape == (16000,) and np.isfinite(wave).all()
        assert base64.b64decode(f["png"]["base64"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads(f["labels"]["text"])["samples"][0]["label"] == 7 and "figure_url" not in s
    r = post(server, "audio", {"num": 1, "label": 2, "seed": 3, "steps": 2})  # with metrics
    assert r.status_code == 200 and r.json()["metrics"]["count"] == 1.0


def test_molecule_samples(server) -> None:
    r = post(server, "molecules", {"num": 1, "steps": 3, "seed": 0, "conditions": {"n": 9}})
    assert r.status_code == 200, r.text
    out = r.json()
    f = files_of(out["samples"][0])
    assert "V2000" in f["sdf"]["text"] and f["xyz"]["text"].split()[0] == "9"
    assert out["samples"][0]["figure_url"].startswith("/v1/molecules/figures/")
    assert "atom_stability" in out["metrics"]


def test_figures_are_rendered_on_request_and_equal_the_inline_ones(server) -> None:
    """By default a sample carries a figure_url instead of a PNG; fetching it gives the bytes the writer puts inline."""
    body = {"num": 1, "label": 4, "seed": 21, **FAST}
    lazy = post(server, "audio", body).json()["samples"][0]
    inline = post(server, "audio", {**body, "figures": "inline"}).json()["samples"][0]
    none = post(server, "audio", {**body, "figures": "none"}).json()["samples"][0]
    assert "png" not in files_of(lazy) and "png" not in files_of(none) and "figure_url" not in none
    assert lazy["digest"] == inline["digest"] == none["digest"]
    r = httpx.get(server.url + lazy["figure_url"], timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == base64.b64decode(files_of(inline)["png"]["base64"])
    assert httpx.get(server.url + lazy["figure_url"], timeout=60).content == r.content
    mol = post(server, "molecules", {"num": 1, "steps": 3, "seed": 0, "conditions": {"n": 9}, "metrics": False}).json()
    png = httpx.get(server.url + mol["samples"][0]["figure_url"], timeout=60)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    missing = httpx.get(server.url + "/v1/audio/figures/0123-4.png", timeout=10)
    assert missing.status_code == 404 and "--max-figures" in missing.json()["detail"]
    assert httpx.get(server.url + lazy["figure_url"].replace("/audio/", "/molecules/"), timeout=10).status_code == 404


def test_figure_store_renders_once_and_forgets_the_least_recently_used(models) -> None:
    from multidiff.serve import Figures

    m = models["audio"]
    store = Figures(capacity=2)
    reqs = pipeline.layout(m, 3, {"label": "1"}, seed=0)
    decoded = [pipeline.decode(m, [r], [torch.zeros_like(r.like)]) for r in reqs]
    for k, d in enumerate(decoded):
        store.add("audio", f"s{k}", m, d)
    assert store.png("audio", "s0") is None and store.renders == 0  # forgotten: nothing rendered
    threads = [threading.Thread(target=store.png, args=("audio", "s2")) for _ in range(4)]  # concurrent GETs
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert store.renders == 1 and store.png("audio", "s2")[:4] == b"\x89PNG" and store.renders == 1
    assert store.png("audio", "s1")[:4] == b"\x89PNG" and store.renders == 2
    store.add("audio", "s2", m, decoded[2])  # the same sample again keeps its rendered picture
    assert store.png("audio", "s2") is not None and store.renders == 2
    store.add("audio", "s3", m, decoded[0])  # s1 was used least recently: it goes
    assert store.png("audio", "s1") is None and store.png("audio", "s2") is not None


def test_write_without_figures_also_serves_domains_of_the_older_contract(models, tmp_path) -> None:
    """A plugin domain whose ``write(samples, out_dir)`` predates ``figures``: still served, its PNG left out."""
    m = models["audio"]
    original = type(m.domain).write

    class OldDomain(type(m.domain)):
        def write(self, samples, out_dir):  # noqa: ANN001, ANN201 - the older signature on purpose
            return original(self, samples, out_dir)

    old = dataclasses.replace(m, domain=OldDomain())
    samples = pipeline.decode(m, pipeline.layout(m, 1, {"label": "2"}, seed=0), [torch.zeros(1, 1, 16000)])
    files, _ = pipeline.write_samples(old, samples, tmp_path / "a", evaluate=False, figures=False)
    assert [f.suffix for f in files] == [".wav", ".json"]
    files, _ = pipeline.write_samples(old, samples, tmp_path / "b", evaluate=False)
    assert ".png" in [f.suffix for f in files]


def test_figures_capacity_must_cover_a_request() -> None:
    from multidiff.serve import ServeConfig

    with pytest.raises(ValueError, match="max_figures: expected >= max_num"):
        ServeConfig(max_num=64, max_figures=8)


def sse_events(response: httpx.Response):
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def test_stream_progress_and_samples(server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/audio/samples?stream=true", json={**FAST, "num": 2, "steps": 3},
                      timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [e for e, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("sample") == 2
    assert [d["step"] for e, d in events if e == "progress"][:3] == [1, 2, 3]
    assert kinds.index("progress") < kinds.index("sample")


def test_invalid_requests_name_the_field(server) -> None:
    cases = [
        ("audio", {"label": "eleven", **FAST}, "label", "unknown label"),
        ("audio", {"steps": 0}, "steps", "greater than or equal to 1"),
        ("audio", {"num": 9, **FAST}, "num", "at most 8"),
        ("audio", {"sampler": "magic", **FAST}, "sampler", "ancestral"),
        ("audio", {"nmu": 2}, "nmu", "Extra inputs"),
        ("molecules", {"conditions": {"alpha": 80}, **FAST}, "conditions", "unknown condition"),
        ("molecules", {"conditions": {"n": 99}, **FAST}, "conditions", "out of range"),
        ("audio", {"inpaint": {"filename": "big.wav", "data": base64.b64encode(b"\0" * 200_000).decode()}, "mask": "0.1:0.2"},
         "inpaint", "exceeds"),
    ]
    for domain, body, field, words in cases:
        r = post(server, domain, body)
        assert r.status_code == 422, (body, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"][:2] == ["body", field] and words in detail["msg"], (body, detail)
    r = httpx.post(f"{server.url}/v1/audio/samples", files={"inpaint": ("big.wav", b"\0" * 200_000)},
                   data={"params": json.dumps({"mask": "0.1:0.2"})}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "inpaint"]
    assert post(server, "images", {}).status_code == 404


def test_inpaint_upload_keeps_the_known_part(server) -> None:
    t = np.arange(16000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, clip, 16000, format="WAV", subtype="PCM_16")
    r = httpx.post(f"{server.url}/v1/audio/samples", files={"inpaint": ("clip.wav", buf.getvalue(), "audio/wav")},
                   data={"params": json.dumps({"mask": "0.3:0.5", "label": 3, "seed": 1, **FAST})}, timeout=300)
    assert r.status_code == 200, r.text
    wave, _ = sf.read(io.BytesIO(base64.b64decode(files_of(r.json()["samples"][0])["wav"]["base64"])), dtype="int16")
    keep = np.ones(16000, dtype=bool)
    keep[4800:8000] = False
    assert np.array_equal(wave[keep], clip[keep]) and not np.array_equal(wave[~keep], clip[~keep])


def test_same_request_alone_and_in_a_busy_batch_is_bit_identical(server) -> None:
    body = {"num": 1, "label": 3, "seed": 11, **FAST}
    alone = post(server, "audio", body).json()["samples"][0]
    count, total = server.metric("multidiff_batch_samples_count", 'domain="audio"'), server.metric("multidiff_batch_samples_sum", 'domain="audio"')
    bodies = [{"num": 1, "label": 5, "seed": 2, **FAST}, body, {"num": 2, "seed": 40, **FAST}]
    results: list = [None] * len(bodies)

    def go(k: int) -> None:
        results[k] = post(server, "audio", bodies[k])

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(bodies))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(r.status_code == 200 for r in results)
    batched = results[1].json()["samples"][0]
    assert server.metric("multidiff_batch_samples_count", 'domain="audio"') == count + 1  # one sampler call
    assert server.metric("multidiff_batch_samples_sum", 'domain="audio"') == total + 4  # of all four samples
    assert batched["digest"] == alone["digest"]
    assert files_of(batched)["wav"]["base64"] == files_of(alone)["wav"]["base64"]


def test_full_queue_429_and_disconnect_drops_samples(server) -> None:
    dropped = server.metric("multidiff_samples_dropped_total", 'domain="audio"')
    with httpx.stream("POST", f"{server.url}/v1/audio/samples?stream=true", json={**FAST, "num": 8, "steps": 40},
                      timeout=300) as r:
        events = sse_events(r)
        assert next(events)[0] == "queued"
        assert next(events)[0] == "progress"  # 4 samples running, 4 waiting: the queue holds 8
        full = post(server, "audio", {"num": 5, **FAST})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    deadline = time.monotonic() + 60  # leaving the stream cancels the job: waiting samples dropped, batch abandoned
    while time.monotonic() < deadline and (server.metric("multidiff_samples_dropped_total", 'domain="audio"') < dropped + 4
                                           or server.metric("multidiff_running_samples") > 0):
        time.sleep(0.2)
    assert server.metric("multidiff_samples_dropped_total", 'domain="audio"') == dropped + 4
    assert server.metric("multidiff_running_samples") == 0 and httpx.get(server.url + "/healthz").json()["queue"] == 0
    assert server.metric("multidiff_requests_rejected_total", 'reason="queue_full"') >= 1


def test_graceful_shutdown_finishes_running_requests(server) -> None:
    """Last test of the module: SIGTERM while a request runs; it still gets its samples, then the server exits."""
    result: list = []
    th = threading.Thread(target=lambda: result.append(post(server, "audio", {**FAST, "num": 2, "steps": 12})))
    th.start()
    deadline = time.monotonic() + 60
    while server.metric("multidiff_running_samples") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    th.join(60)
    assert result and result[0].status_code == 200 and len(result[0].json()["samples"]) == 2
