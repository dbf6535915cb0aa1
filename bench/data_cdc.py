"""Change data capture of a file data set: `multidiff data audio` on FSDD (3,000 real recordings), first vs again.

Prints one JSON line per number ({what, setting, number, unit, machine}, see bench/_common.py):
- the first preparation (empty cache: every file decoded, resampled 8 -> 16 kHz, indexed, written),
- re-preparing the unchanged folder (stat only) and its share of the first preparation (goal: < 5 %),
- an incremental update after 30 files changed, 30 removed and 30 added, with the check that it equals a full
  rebuild bit for bit,
- for reference, the old uncached loader (every file decoded and resampled in batches on every load).

The recordings are read in place (read-only); the benchmark works on a temporary folder of symbolic links to them,
so changing, removing and adding files never touches ../shared/data/fsdd. Usage:
    python bench/data_cdc.py [--root ../shared/data/fsdd]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402


def prepare(root: Path) -> tuple[float, dict]:
    """One `multidiff data audio data.source=fsdd data.root=ROOT` (the domain's prepare_data), timed."""
    from multidiff import pipeline
    from multidiff.registry import get_domain

    dom = get_domain("audio")
    cfg = pipeline.load_run_config(dom, "fsdd", [f"data.root={root}"])
    start, cpu = time.perf_counter(), time.process_time()
    summary = dom.prepare_data(cfg)
    summary["cpu_s"] = time.process_time() - cpu
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd")
    args = parser.parse_args()
    rec = args.root / "recordings"
    if not rec.is_dir():
        sys.exit(f"FSDD not found at {rec}")
    warnings.simplefilter("ignore")
    import domains.audio.data  # noqa: F401  - imports outside the timings
    import domains.audio.domain  # noqa: F401
    import multidiff.datacache  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="multidiff-cdc-") as tmp:
        os.environ["MULTIDIFF_CACHE"] = str(Path(tmp) / "cache")
        folder = Path(tmp) / "fsdd" / "recordings"
        folder.mkdir(parents=True)
        wavs = sorted(rec.glob("*.wav"))
        for p in wavs:
            (folder / p.name).symlink_to(p.resolve())
        setting = {"data": "FSDD v1.0.10 recordings (symlinked, read in place)", "files": len(wavs),
                   "processing": "decode, resample 8 -> 16 kHz, 1 s clips"}
        first, s1 = prepare(folder.parent)
        assert s1["changes"]["added"] == len(wavs), s1["changes"]
        emit("data_prepare_first", setting, first, "s")
        again, s2 = prepare(folder.parent)
        assert s2["changes"]["added"] == s2["changes"]["changed"] == s2["changes"]["removed"] == 0, s2["changes"]
        emit("data_prepare_unchanged", setting, again, "s")
        emit("data_prepare_unchanged_share_of_first", setting, 100 * again / first, "%")
        emit("data_prepare_first_cpu", setting, s1["cpu_s"], "cpu s")
        emit("data_prepare_unchanged_cpu", setting, s2["cpu_s"], "cpu s")
        emit("data_prepare_unchanged_cpu_share_of_first", setting, 100 * s2["cpu_s"] / s1["cpu_s"], "%")

        names = [p.name for p in wavs]
        for name in names[:30]:  # changed: a real file with other content (the recording at half gain)
            import soundfile as sf

            x, sr = sf.read(str(rec / name), dtype="int16")
            (folder / name).unlink()
            sf.write(str(folder / name), x // 2, sr, subtype="PCM_16")
        for name in names[30:60]:
            (folder / name).unlink()
        for k, name in enumerate(names[60:90]):
            digit = name.split("_")[0]
            (folder / f"{digit}_cdcbench_{k}.wav").symlink_to((rec / name).resolve())
        inc, s3 = prepare(folder.parent)
        c = s3["changes"]
        assert (c["added"], c["changed"], c["removed"]) == (30, 30, 30), c
        emit("data_prepare_incremental", {**setting, "added": 30, "changed": 30, "removed": 30}, inc, "s")

        from domains.audio import data as adata

        incremental = adata.load_fsdd(folder.parent, "train", cache=True)
        os.environ["MULTIDIFF_CACHE"] = str(Path(tmp) / "cache_full")
        full_start = time.perf_counter()
        full = adata.load_fsdd(folder.parent, "train", cache=True)
        full_s = time.perf_counter() - full_start
        same = (incremental.version == full.version and incremental.sources == full.sources
                and bool((incremental.audio == full.audio).all()) and bool((incremental.labels == full.labels).all()))
        emit("data_incremental_equals_full_rebuild", {**setting, "full_rebuild_s": round(full_s, 3)}, float(same),
             "bool")
        start = time.perf_counter()
        adata.load_fsdd(folder.parent, "train")
        adata.load_fsdd(folder.parent, "test")
        emit("data_load_uncached_reference", {**setting, "loader": "load_fsdd without the cache, train + test"},
             time.perf_counter() - start, "s")


if __name__ == "__main__":
    main()
