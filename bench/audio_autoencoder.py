"""Reconstruction quality and speed of an audio autoencoder (issue #17) on the held-out test clips.

For the test split of the autoencoder's data (or ``--source``/``--root``), encode and decode every clip and report,
one JSON line each: SNR (dB), multi-resolution STFT distance, the judge's accuracy on the reconstructions next to
its accuracy on the originals, the noise floor (quietest vs loudest 50 ms frame) of both, the latent shape, and the
encode / decode real-time factors on this machine; FID and IS of originals and reconstructions against the training
clips (the ceiling a latent model on this autoencoder can reach).

    python bench/audio_autoencoder.py --checkpoint data/checkpoints/audio_autoencoder.safetensors [--threads 1]
    python bench/audio_autoencoder.py --checkpoint runs/audio_ae --source fsdd --root ../shared/data/fsdd
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import emit  # noqa: E402
from domains.audio.domain import DEFAULT_CLASSIFIER, load_any_classifier, load_clips  # noqa: E402
from domains.audio.latent import encode_clips, load_autoencoder  # noqa: E402
from domains.audio.metrics import (conditional_accuracy, evaluate_audio, multi_resolution_stft_distance,
                                    noise_floor_db)  # noqa: E402
from multidiff.pipeline import load_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="autoencoder run dir, checkpoint dir or exported .safetensors")
    p.add_argument("--source", default=None, help="data source of the test clips (default: the autoencoder's)")
    p.add_argument("--root", default=None, help="data root for --source fsdd/speechcommands/folder")
    p.add_argument("--max-clips", type=int, default=None, help="at most this many test clips")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="the judge")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run = load_run(a.checkpoint)
    data = run.cfg.data
    if a.source:
        data = dataclasses.replace(data, source=a.source, root=a.root, class_names=None, extra_sources={})
    data = dataclasses.replace(data, max_clips=a.max_clips)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clips = load_clips(data, "test")
    ae = load_autoencoder(str(run.path))
    x = clips.audio
    x = x[..., : x.shape[-1] - x.shape[-1] % ae.compression]
    setting = {"checkpoint": str(run.path), "step": run.step, "data": data.source, "clips": len(clips),
               "compression": ae.compression, "latent_channels": ae.latent_channels}
    with torch.no_grad():
        t0 = time.perf_counter()
        z = encode_clips(ae, x)
        t1 = time.perf_counter()
        y = torch.cat([ae.decode(z[i: i + 64]) for i in range(0, z.shape[0], 64)]).clamp(-1, 1)
        t2 = time.perf_counter()
    seconds = x.shape[0] * x.shape[-1] / clips.sample_rate
    emit("latent numbers per clip", setting, z[0].numel(), f"numbers (waveform: {x.shape[-1]})")
    emit("encode rtf", setting, (t1 - t0) / seconds, "compute s / audio s")
    emit("decode rtf", setting, (t2 - t1) / seconds, "compute s / audio s")
    err = (y - x).pow(2).sum(dim=(1, 2))
    snr = 10 * torch.log10(x.pow(2).sum(dim=(1, 2)) / err.clamp_min(1e-20))
    emit("snr", setting, float(snr.median()), "dB (median over clips)")
    emit("mr_stft", setting, multi_resolution_stft_distance(y, x)["mr_stft"], "MR-STFT distance (256/512/1024)")
    emit("noise_floor_db", {**setting, "row": "reconstructions"}, float(torch.tensor(noise_floor_db(y, clips.sample_rate)).median()), "dB")
    emit("noise_floor_db", {**setting, "row": "originals"}, float(torch.tensor(noise_floor_db(x, clips.sample_rate)).median()), "dB")
    clf = load_any_classifier(a.classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = load_clips(dataclasses.replace(data, max_clips=None), "train")
    with torch.no_grad():
        for row, audio in (("originals", x), ("reconstructions", y)):
            logits = torch.cat([clf(audio[i: i + 128]) for i in range(0, audio.shape[0], 128)])
            emit("judge accuracy", {**setting, "row": row, "classifier": a.classifier},
                 conditional_accuracy(logits, clips.labels), "fraction")
            m = evaluate_audio(audio, clf, reference=train.audio[..., : audio.shape[-1]], labels=clips.labels,
                               sample_rate=clips.sample_rate, ndb_bins=min(50, max(2, audio.shape[0] // 4)))
            for key in ("fid", "is"):
                emit(key, {**setting, "row": row, "classifier": a.classifier, "reference": "train split"}, m[key],
                     key.upper())


if __name__ == "__main__":
    main()
