"""A job's media lookups when every file's features are cached (a second checkpoint evaluated on the same set): with
the file digests remembered on disk (model/media/file_hashes.py) against hashing every file again, each in a fresh
interpreter, taking turns. Ten-second 48 kHz stereo wavs (1.9 MB, as MusicCaps' clips), `look_up` in `--workers`
threads as a job runs it. The files were just written, so both sides read them from the page cache: the difference
is the hashing alone, not the disk reads a cold page cache would add.

    PYTHONPATH=.:tests python benchmarks/profiling/warm_lookups.py OUT.json [--files N] [--workers N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
from model.media.features import FeatureCache, look_up
root, workers, paths = Path(sys.argv[1]), int(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
start = time.perf_counter()
lookup = look_up(FeatureCache(root, "fake-v1"), "audio", paths, workers)
print(json.dumps({"seconds": time.perf_counter() - start, "hits": sum(r is not None for r in lookup.results)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import synth
    import torch

    from model.media.features import FeatureCache
    from model.media.file_hashes import HASHES_FILE

    work = Path(tempfile.mkdtemp(prefix="dr_warm_lookups_"))
    paths = [synth.write_wav(work / f"m{i}.wav", 10.0, 200.0 + i, sr=48000, channels=2) for i in range(args.files)]
    cache = FeatureCache(work / "cache", "fake-v1")
    for p in paths:
        cache.put("audio", p, torch.randn(3, 1024))
    time.sleep(2.5)  # settled (file_hashes.SETTLED_NS): the first run's digests are kept on disk
    memo = work / "cache" / HASHES_FILE
    times: dict[str, list[float]] = {"hashing every file": [], "digests remembered": []}
    for _ in range(args.repeats):
        for name in times:
            if name == "hashing every file":
                memo.unlink(missing_ok=True)
            cmd = [sys.executable, "-c", CHILD, str(work / "cache"), str(args.workers), *map(str, paths)]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            assert got["hits"] == args.files, got
            times[name].append(round(got["seconds"], 3))
    report = {
        "files": args.files,
        "bytes_per_file": paths[0].stat().st_size,
        "workers": args.workers,
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
