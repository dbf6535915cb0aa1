"""Load test of ``multidiff serve`` on localhost: throughput and latency, micro-batching on vs ``--max-batch 1``.

For each batching setting a real server is started on 127.0.0.1 (shipped checkpoint by default); for each number of
concurrent clients (1, 4, 16, 64) every client sends one-sample requests back to back until the setting's request
budget or time budget is spent. Numbers, one JSON line each (``{"what", "setting", "number", "unit", "machine"}``):
``serve_throughput`` (samples/s), ``serve_latency_p50`` / ``serve_latency_p99`` (s, request sent to answer),
``serve_batch_mean`` (samples per sampler call, from the server's /metrics). ``--figures inline`` makes the server
render each sample's picture (audio: a matplotlib spectrogram) as it did before pictures were served on request.

    python bench/serve_load.py                                    # audio, 10 steps, 1/4/16/64 clients
    python bench/serve_load.py --clients 1 16 --requests 48 --steps 10 --max-seconds 120
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int, wait_from: str) -> tuple[subprocess.Popen, str]:
    """``multidiff serve`` on a free loopback port; returns (process, base url) once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "multidiff.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--wait-from", wait_from, "--max-queue", "4096",
           "--log-level", "warning"]
    if args.checkpoint:
        cmd += ["--checkpoint", f"{args.domain}={args.checkpoint}"]
    else:
        cmd += ["--checkpoint", f"{args.domain}={ROOT / 'data' / 'checkpoints' / (args.domain + '.safetensors')}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("multidiff serve did not start within 180 s")


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


def load(url: str, args: argparse.Namespace, clients: int) -> tuple[float, list[float], int]:
    """``clients`` concurrent clients, one-sample requests until ``args.requests`` are sent or the time budget is
    spent; returns (wall seconds, latencies, samples)."""
    body = {"num": 1, "steps": args.steps, "metrics": False, "figures": args.figures}
    sent = 0
    lock = threading.Lock()
    latencies: list[float] = []
    stop_at = time.monotonic() + args.max_seconds
    total = max(args.requests, clients)

    def client(k: int) -> None:
        nonlocal sent
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if sent >= total or time.monotonic() > stop_at:
                        return
                    sent += 1
                    seed = sent
                t0 = time.monotonic()
                r = http.post(f"{url}/v1/{args.domain}/samples", json={**body, "seed": seed})
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
                with lock:
                    latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.monotonic() - start, latencies, len(latencies)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="audio")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint of --domain")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per client count (at least one per client)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time budget per client count")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=16, help="the batched setting (compared with --max-batch 1)")
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--figures", choices=("url", "inline", "none"), default="url",
                        help="the requests' figures: url (rendered only when fetched; this bench fetches none), inline PNG, none")
    parser.add_argument("--wait-from", nargs="+", choices=("idle", "arrival"), default=["arrival"],
                        help="batched settings to compare: what --max-wait-ms counts from (serve --wait-from)")
    args = parser.parse_args()
    for max_batch, wait_from in [(args.max_batch, w) for w in args.wait_from] + [(1, "arrival")]:
        proc, url = start_server(args, max_batch, wait_from)
        try:
            httpx.post(f"{url}/v1/{args.domain}/samples", json={"num": 1, "steps": args.steps, "metrics": False}, timeout=600)
            for clients in args.clients:
                calls, batched = metric(url, "multidiff_batch_samples_count"), metric(url, "multidiff_batch_samples_sum")
                wall, lat, samples = load(url, args, clients)
                setting = (f"{args.domain} steps={args.steps} clients={clients} max_batch={max_batch} "
                           f"max_wait_ms={args.max_wait_ms:g} wait_from={wait_from} figures={args.figures}")
                emit("serve_throughput", setting, samples / wall, "samples/s", digits=4)
                emit("serve_latency_p50", setting, percentile(lat, 50), "s", digits=4)
                emit("serve_latency_p99", setting, percentile(lat, 99), "s", digits=4)
                calls = metric(url, "multidiff_batch_samples_count") - calls
                emit("serve_batch_mean", setting, (metric(url, "multidiff_batch_samples_sum") - batched) / max(calls, 1),
                     "samples/call", digits=4)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
