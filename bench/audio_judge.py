"""Accuracy of digit classifiers (the audio judges) on every labelled split at hand, one JSON line per (judge, split).

Splits: the espeak digits (``digits train`` = the training voices, ``digits test`` = held-out voices: accents and
variants no training voice has); FSDD (``--fsdd DIR``: ``fsdd train`` = takes 5-49, ``fsdd test`` = takes 0-4 of the
same six speakers, FSDD's standard split); ``--fsdd-unseen DIR``: an FSDD-layout folder whose speakers a judge was
not trained on (all takes are scored); Speech Commands digits (``--speechcommands DIR``: validation and test lists);
``--folder DIR``: label folders named by digit (``0``..``9`` or ``zero``..``nine``).

    python bench/audio_judge.py --classifier data/checkpoints/audio_classifier.safetensors RUN ... --fsdd ../shared/data/fsdd

Numbers: ``accuracy`` (fraction, with n in the setting) per judge and split, then a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import emit  # noqa: E402
from domains.audio import data as adata  # noqa: E402
from domains.audio.classifier import accuracy  # noqa: E402
from domains.audio.domain import classifier_class_names, load_any_classifier, match_classes  # noqa: E402


def splits(a: argparse.Namespace) -> dict[str, adata.AudioClips]:
    """The labelled clip sets to score, by name."""
    out: dict[str, adata.AudioClips] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adata.AudioDataWarning)
        if not a.no_digits:
            if not a.test_only:
                out["digits train (espeak training voices)"] = adata.load_digits(split="train", progress=False)
            out["digits test (held-out espeak voices)"] = adata.load_digits(split="test", progress=False)
        if a.fsdd:
            if not a.test_only:
                out["fsdd train (takes 5-49)"] = adata.load_fsdd(a.fsdd, "train", cache=True)
            out["fsdd test (takes 0-4)"] = adata.load_fsdd(a.fsdd, "test", cache=True)
        if a.fsdd_unseen:
            parts = [adata.load_fsdd(a.fsdd_unseen, s, cache=True) for s in ("train", "test")]
            out[f"fsdd unseen speakers ({', '.join(sorted(set(parts[0].groups)))}; all takes)"] = \
                adata.concat_clips(parts)
        if a.speechcommands:
            for s in ("validation", "test"):
                out[f"speechcommands {s}"] = adata.load_speechcommands(a.speechcommands, s, cache=True)
        for folder in a.folder or []:
            out[f"folder {folder}"] = adata.load_folder(folder, cache=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", nargs="+", required=True, help="judge files or classifier runs")
    p.add_argument("--fsdd", default=None, help="FSDD root (recordings/)")
    p.add_argument("--fsdd-unseen", default=None, help="FSDD-layout folder of speakers the judges did not train on")
    p.add_argument("--speechcommands", default=None, help="Speech Commands v0.02 root")
    p.add_argument("--folder", nargs="*", default=None, help="label folders (digit names)")
    p.add_argument("--no-digits", action="store_true", help="skip the espeak digits")
    p.add_argument("--test-only", action="store_true", help="skip the training splits of the espeak digits and FSDD")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = splits(a)
    table: dict[str, dict[str, str]] = {}
    for path in a.classifier:
        clf = load_any_classifier(path)
        judge = classifier_class_names(clf)
        for name, clips in data.items():
            mapping, missing = match_classes(list(clips.class_names), judge)
            if mapping is None:
                raise SystemExit(f"{path} does not know the classes {missing} of {name}")
            clips = adata.AudioClips(clips.audio, mapping[clips.labels], clips.groups, clips.sample_rate,
                                     list(judge or clips.class_names), clips.sources)
            acc = accuracy(clf, clips)
            emit("accuracy", {"classifier": str(path), "split": name, "n": len(clips)}, acc, "fraction")
            table.setdefault(name, {})[str(path)] = f"{acc:.3f} ({round(acc * len(clips))}/{len(clips)})"
    heads = list(a.classifier)
    print("| split | " + " | ".join(heads) + " |", file=sys.stderr)
    print("|---|" + "---|" * len(heads), file=sys.stderr)
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(row[h] for h in heads) + " |", file=sys.stderr)


if __name__ == "__main__":
    main()
