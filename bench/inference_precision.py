"""Inference precision: fp32 vs bf16 autocast vs int8 dynamic quantization (``multidiff sample --precision``), each on
the same samples (same layout, same per-sample noise) of the shipped audio and molecules checkpoints and a toy model.

Per (model, precision), one JSON line each: ``seconds`` (wall, best of --repeats) and ``cpu_seconds`` (process CPU
time, steadier on a shared machine) for one sampler call, ``speedup`` vs fp32 (CPU time), ``rel_diff`` = RMS(x - x_fp32)
/ RMS(x_fp32) of the final samples, and for audio ``label_agreement`` (share of clips the shipped digit classifier
labels as it labels the fp32 clip) and ``conditional_accuracy`` (vs the requested digit).

    OMP_NUM_THREADS=1 python bench/inference_precision.py [--models audio,molecules,toy] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import emit  # noqa: E402

from multidiff import pipeline  # noqa: E402
from multidiff.inference import PRECISIONS, set_precision  # noqa: E402

SETUP = {  # model -> (checkpoint or None for a freshly trained toy, samples, conditions, sampler, steps)
    "audio": (ROOT / "data/checkpoints/audio.safetensors", 20, {}, "dpmpp_2m", 10),
    "molecules": (ROOT / "data/checkpoints/molecules.safetensors", 16, {}, "heun", 25),
    "toy": (None, 2000, {}, "dpmpp_2m", 25),
}


def _toy_checkpoint(tmp: Path) -> Path:
    dom = pipeline.get_domain("toy")
    cfg = pipeline.load_run_config(dom, None, ["train.steps=600", "train.ckpt_every=600"])
    pipeline.train(dom, cfg, tmp / "toy", device="cpu", progress=False)
    return tmp / "toy"


def _run(ckpt: Path, precision: str, num: int, conditions: dict, sampler: str, steps: int, repeats: int):
    model = pipeline.load_model(ckpt)
    used = set_precision(model.denoiser, precision, "cpu")
    settings = pipeline.sampler_settings(model, sampler=sampler, steps=steps)
    requests = pipeline.layout(model, num, conditions, seed=0)
    seeds = list(range(num))
    pipeline.generate_batch(model, requests, seeds, pipeline.sampler_settings(model, sampler=sampler, steps=1))  # warm-up
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        xs = pipeline.generate_batch(model, requests, seeds, settings)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return model, requests, torch.cat(xs).double(), used, best_wall, best_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="audio,molecules,toy")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            ckpt, num, conditions, sampler, steps = SETUP[name]
            ckpt = ckpt if ckpt is not None else _toy_checkpoint(Path(tmp))
            ref = None
            for precision in PRECISIONS:
                model, requests, x, used, wall, cpu = _run(ckpt, precision, num, conditions, sampler, steps, a.repeats)
                setting = {"model": name, "precision": precision, "used": used, "sampler": sampler, "steps": steps,
                           "num": num}
                if ref is None:
                    ref = (x, cpu, model, requests)
                emit("inference_seconds", setting, wall, "s")
                emit("inference_cpu_seconds", setting, cpu, "s")
                emit("inference_speedup", setting, ref[1] / cpu, "x vs fp32 (CPU time)")
                emit("inference_rel_diff", setting, float((x - ref[0]).pow(2).mean().sqrt() / ref[0].pow(2).mean().sqrt()),
                     "RMS(x - x_fp32) / RMS(x_fp32)")
                if name == "audio":
                    from domains.audio.classifier import audio_at, classifier_outputs, load_classifier

                    clf = load_classifier(ROOT / "data/checkpoints/audio_classifier.safetensors")
                    labels = torch.cat([r.meta["labels"] for r in requests])
                    rate = int(requests[0].meta["sample_rate"])

                    def predict(audio: torch.Tensor) -> torch.Tensor:
                        return classifier_outputs(clf, audio_at(audio.float(), rate, clf.sample_rate))[0].argmax(-1)

                    pred, pred_ref = predict(x.clamp(-1, 1)), predict(ref[0].clamp(-1, 1))
                    emit("inference_label_agreement", setting, float((pred == pred_ref).double().mean()), "share")
                    emit("inference_conditional_accuracy", setting, float((pred == labels).double().mean()), "share")


if __name__ == "__main__":
    main()
