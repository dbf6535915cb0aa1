"""Audio sample quality of one checkpoint under the SC09 protocol, next to the real data's own scores.

Meant for comparing the same recipe after different training times (e.g. 1 h vs 3 h of ``multidiff train audio``):

1. load ``--checkpoint`` (a run dir, checkpoint dir or .safetensors; EMA weights) with ``pipeline.load_model``;
2. sample ``--per-label`` clips for every label with ``domain.request(cfg, n, {"label": i})`` + ``pipeline.generate``,
   using the recipe's ``sample`` settings (sampler, grid, steps, guidance) unless overridden, and write them with
   ``domain.write`` (WAVs, labels.json, spectrograms.png) into ``--out`` (default: a temporary directory);
3. score them with ``domain.evaluate`` (the shipped digit classifier ``data/checkpoints/audio_classifier.safetensors``
   or the run's ``data.classifier``, or each ``--classifier`` in turn on the same samples, so that numbers under an
   old and a new judge can be mapped; FID / AM / NDB against the held-out test split);
4. score the real held-out test clips the same way with ``domains.audio.metrics.reference_row`` (against the
   training clips): the row a perfect model would approach. It is printed twice: all test clips, and a
   label-balanced subset of the same size as the generated set (FID and NDB/K depend on the sample size).

Reference data: the checkpoint's ``data`` section, but ``data.max_clips`` is dropped (full splits) unless
``--keep-max-clips``. NDB/K uses ``min(50, max(2, N // 4))`` bins for N generated clips, as ``domain.evaluate`` does,
for every row.

Numbers, one JSON line each (``{"what", "setting", "number", "unit", "machine"}``): ``cond_acc``, ``fid``, ``is``,
``mis``, ``am``, ``ndb_k`` (and ``ndb``, the count of different bins) per row ``setting.row`` in
{"samples", "real test (all)", "real test (size-matched)"}, plus ``sampling s``, ``rtf`` and ``patch_grid_share``
(the frame-periodic part of the denoiser's output on silence), ``noise_floor_db`` (quietest vs loudest 50 ms frame,
samples and real clips) and ``grid_line_db`` (how far the lines at multiples of
sample_rate / patch stand above their spectral neighbourhood in the samples, and in the real clips for reference).

    python bench/audio_quality.py --checkpoint runs/audio_fast [--per-label 16] [--steps 25] [--out samples/q]
    python bench/audio_quality.py --checkpoint data/checkpoints/audio.safetensors runs/audio_latent   # side by side
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from domains.audio.domain import DEFAULT_CLASSIFIER, load_any_classifier, load_clips  # noqa: E402
from domains.audio.metrics import line_prominence_db, noise_floor_db, reference_row  # noqa: E402
from multidiff import pipeline  # noqa: E402
from bench._common import emit  # noqa: E402

METRICS = (("cond_acc", "fraction"), ("fid", "FID"), ("is", "IS"), ("mis", "mIS"), ("am", "AM"),
           ("ndb_k", "NDB/K"), ("ndb", "bins"))


def emit_row(row: str, metrics: dict, setting: dict) -> None:
    """The SC09 metrics of one row (samples or real clips); metrics missing from ``metrics`` are skipped."""
    for key, unit in METRICS:
        if key in metrics:
            emit(key, {**setting, "row": row, "n": int(metrics.get("n", metrics.get("count", 0)))}, metrics[key], unit)


def balanced_subset(labels: torch.Tensor, per_label: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of up to ``per_label`` random clips of every class."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(num_classes):
        where = torch.nonzero(labels == c).flatten()
        idx.append(where[torch.randperm(len(where), generator=g)[:per_label]])
    return torch.cat(idx).sort().values


def patch_grid_share(model: pipeline.LoadedModel, times: tuple[float, ...] = (0.6, 0.25, 0.1), seed: int = 0) -> dict[float, float]:
    """Share of the denoised output's RMS that repeats every ``model.patch`` samples when the clean signal is silence.

    The denoiser sees pure noise around x0 = 0 (labels 0..9); a perfect model returns ~0 there, and a frame-periodic
    residual of the patchify head shows up as tonal lines at multiples of sample_rate / patch (1 kHz at 16 kHz / 16).
    """
    den, cfg = model.denoiser, model.cfg
    patch = int(cfg.model.patch)
    length = int(round(cfg.data.sample_rate * cfg.data.seconds))
    length -= length % patch
    labels = torch.arange(len(cfg.data.class_names))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in times:
        tt = torch.tensor(t, dtype=torch.float64)
        x = float(den.schedule.sigma(tt)) * torch.randn(len(labels), 1, length, generator=g)
        with torch.no_grad():
            d = den(x, tt, {"label": labels})
        frames = d.reshape(len(labels), length // patch, patch)
        periodic = frames.mean(1, keepdim=True) - frames.mean((1, 2), keepdim=True)
        out[t] = float(periodic.pow(2).mean().sqrt() / d.pow(2).mean().sqrt().clamp_min(1e-12))
    return out


def emit_grid_lines(audio: torch.Tensor, cfg: Any, setting: dict) -> None:
    """``grid_line_db``: mean prominence of the spectral lines at multiples of sample_rate / patch (per line in the setting)."""
    spacing = cfg.data.sample_rate / cfg.model.patch
    lines = line_prominence_db(audio, cfg.data.sample_rate, spacing)
    emit("grid_line_db", {**setting, "spacing_hz": spacing, "per_line": [round(v, 2) for v in lines]},
         sum(lines) / len(lines), "dB over neighbouring bins (mean over lines)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="run dir, checkpoint dir or .safetensors file; several: each in turn on the same settings "
                        "(e.g. a waveform and a latent model side by side), the real rows once")
    p.add_argument("--per-label", type=int, default=16, help="generated clips per label")
    p.add_argument("--sampler", default=None, help="default: the recipe's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's sample.steps")
    p.add_argument("--grid", default=None, help="default: the recipe's sample.grid")
    p.add_argument("--guidance", type=float, default=None, help="default: the recipe's sample.guidance")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for LO < t <= HI (default: the recipe's sample.guidance_interval)")
    p.add_argument("--batch", type=int, default=None, help="clips per generate call (default: sample.batch_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="keep the samples here (default: a temporary directory)")
    p.add_argument("--keep-max-clips", action="store_true",
                   help="score against the checkpoint's data.max_clips subset instead of the full splits")
    p.add_argument("--no-reference", action="store_true", help="skip the real-data rows")
    p.add_argument("--classifier", nargs="+", default=None,
                   help="judge(s): the same samples and real clips are scored by each in turn (default: the run's "
                        "data.classifier, else the shipped one)")
    a = p.parse_args()
    if a.per_label < 1:
        p.error("--per-label must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)

    for k, checkpoint in enumerate(a.checkpoint):
        model = pipeline.load_model(checkpoint)
        if model.domain.name != "audio":
            p.error(f"{checkpoint}: a {model.domain.name!r} checkpoint, not an audio one")
        out = None if a.out is None else (Path(a.out) if len(a.checkpoint) == 1 else Path(a.out) / f"model{k}")
        run_one(a, model, out, reference=k == 0 and not a.no_reference)


def run_one(a: argparse.Namespace, model: pipeline.LoadedModel, keep: Path | None, reference: bool) -> None:
    """Sample and score one checkpoint; the real-data rows only when ``reference``."""
    domain, cfg = model.domain, model.cfg
    sc = cfg.sample
    sampler, steps = a.sampler or sc.sampler, a.steps or sc.steps
    grid = a.grid or sc.grid
    guidance = sc.guidance if a.guidance is None else a.guidance
    interval = a.guidance_interval or sc.guidance_interval
    interval = None if interval is None else (float(interval[0]), float(interval[1]))  # plain floats for the JSON
    batch = a.batch or sc.batch_size
    eval_cfg = copy.deepcopy(cfg)
    if not a.keep_max_clips:
        eval_cfg.data.max_clips = None
    names = list(cfg.data.class_names)
    setting = {"checkpoint": str(model.path), "step": model.step, "sampler": sampler, "steps": steps, "grid": grid,
               "guidance": guidance, "guidance_interval": interval, "per_label": a.per_label,
               "reference_max_clips": eval_cfg.data.max_clips}

    # --- sample ---
    chunks, labels, meta = [], [], None
    t0 = time.perf_counter()
    for c in range(len(names)):
        done = 0
        while done < a.per_label:
            n = min(batch, a.per_label - done)
            req = domain.request(cfg, n, {"label": str(c)})
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + c * 10_007 + done)
            x = pipeline.generate(model, req, sampler=sampler, steps=steps, grid=grid, guidance=guidance,
                                  guidance_interval=interval, generator=g)
            dec = domain.decode(x, req)
            chunks.append(dec["audio"])
            labels.append(dec["labels"])
            meta = dec
            done += n
    sampling_s = time.perf_counter() - t0
    assert meta is not None
    samples = {**meta, "audio": torch.cat(chunks), "labels": torch.cat(labels)}
    n_gen = samples["audio"].shape[0]
    emit("sampling s", {**setting, "n": n_gen}, sampling_s, "s")
    emit("rtf", {**setting, "n": n_gen}, sampling_s / (n_gen * cfg.data.seconds), "compute s / audio s")

    # --- score the samples (with each judge) ---
    judges = a.classifier or [None]
    with tempfile.TemporaryDirectory() as tmp:
        out = keep if keep is not None else Path(tmp) / "samples"
        domain.write(samples, out)
        for i, judge in enumerate(judges):
            if judge is not None:
                eval_cfg.data.classifier = str(Path(judge).resolve())
            score(a, model, samples, out, eval_cfg, dict(setting), first=i == 0, reference=reference)


def score(a: argparse.Namespace, model: pipeline.LoadedModel, samples: dict, out: Path, eval_cfg: Any,
          setting: dict, first: bool, reference: bool = True) -> None:
    """The sample rows and the real rows under the judge of ``eval_cfg.data.classifier``; the judge-free numbers
    (rms, silent share, lines, patch grid) only with the ``first`` judge."""
    domain, cfg = model.domain, model.cfg
    names = list(cfg.data.class_names)
    n_gen = samples["audio"].shape[0]
    metrics = domain.evaluate(out, eval_cfg)
    if isinstance(metrics.get("classifier_metrics"), str):
        raise SystemExit(f"no classifier metrics: {metrics['classifier_metrics']}")
    if isinstance(metrics.get("reference"), str):
        print(f"warning: reference set {metrics['reference']}", file=sys.stderr)
    setting["classifier"] = metrics.get("classifier", str(DEFAULT_CLASSIFIER))
    emit_row("samples", metrics, setting)
    if first:
        for key in ("rms", "silent_share"):
            emit(key, {**setting, "row": "samples", "n": n_gen}, metrics[key],
                 "fraction" if key == "silent_share" else "rms")
        if metrics.get("noise_floor_db") is not None:
            emit("noise_floor_db", {**setting, "row": "samples", "n": n_gen}, metrics["noise_floor_db"],
                 "dB, quietest vs loudest 50 ms frame (median over clips)")
    if first and cfg.model.patch > 1:
        emit_grid_lines(samples["audio"], cfg, {**setting, "row": "samples"})
        for t, share in patch_grid_share(model).items():
            emit("patch_grid_share", {**setting, "t": t, "patch": cfg.model.patch}, share, "fraction of denoised RMS on silence")

    # --- the real data's row ---
    if not reference:
        return
    clf = load_any_classifier(Path(setting["classifier"]))
    ndb_bins = min(50, max(2, n_gen // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test = load_clips(eval_cfg.data, "test")
        train = load_clips(eval_cfg.data, "train")
    ref_setting = {"classifier": setting["classifier"], "data": eval_cfg.data.source,
                   "reference_max_clips": eval_cfg.data.max_clips, "train_clips": len(train), "ndb_bins": ndb_bins}
    emit_row("real test (all)", reference_row(test, clf, train=train, ndb_bins=ndb_bins), ref_setting)
    sub = test.subset(balanced_subset(test.labels, a.per_label, len(names), a.seed))
    emit_row("real test (size-matched)", reference_row(sub, clf, train=train, ndb_bins=ndb_bins), ref_setting)
    if first:
        emit("noise_floor_db", {**ref_setting, "row": "real test (size-matched)", "n": len(sub)},
             float(torch.tensor(noise_floor_db(sub.audio, sub.sample_rate)).median()),
             "dB, quietest vs loudest 50 ms frame (median over clips)")
    if first and cfg.model.patch > 1:
        emit_grid_lines(sub.audio, cfg, {**ref_setting, "row": "real test (size-matched)"})


if __name__ == "__main__":
    main()
