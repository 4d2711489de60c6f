"""How soon a job's decoding processes decode: `DecodeProcesses` started, then 2 files a worker decoded through it,
timed from the pool's construction (the forkserver's preload, one fork a worker, the first decodes). Each variant
runs in a fresh interpreter (a forkserver is started once a process), variants taking turns.

Variants: the preload `dr` uses (model.media.decoders, with model.media.preprocess: torch, torchaudio, PyAV, PIL,
safetensors), and the same plus torchvision (what it imported until 2026-12-06), each decoding ten-second wavs and
224-pixel PNGs (`DecodeProcesses.find` without a feature cache: every file decoded).

    PYTHONPATH=.:tests python benchmarks/profiling/decoder_start.py OUT.json [--workers N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, multiprocessing.context, sys, time
from pathlib import Path
extra = sys.argv[1].split(",") if sys.argv[1] else []
modality, workers, files = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
real = multiprocessing.context.ForkServerContext.set_forkserver_preload
multiprocessing.context.ForkServerContext.set_forkserver_preload = lambda self, mods: real(self, [*mods, *extra])
from model.media.decoders import DecodeProcesses
start = time.perf_counter()
with DecodeProcesses(workers) as decode:
    decode.starting.join()
    found = [c.result() for c in decode.find(modality, [Path(f) for f in files], None, None)]
    decoded = sum(len(f.inputs) for f in found if f.inputs is not None)
    print(json.dumps({"seconds": time.perf_counter() - start, "decoded": decoded}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import synth

    work = Path(tempfile.mkdtemp(prefix="dr_decoder_start_"))
    count = 2 * args.workers
    media = {
        "audio": [synth.write_wav(work / f"a{i}.wav", 10.0, 220.0 + i) for i in range(count)],
        "image": [synth.write_image(work / f"i{i}.png") for i in range(count)],
    }
    variants = {"dr (no torchvision)": "", "with torchvision": "torchvision"}
    times: dict[str, dict[str, list[float]]] = {v: {m: [] for m in media} for v in variants}
    for _ in range(args.repeats):  # the report is written after each round, so a run cut short keeps its rounds
        for name, extra in variants.items():
            for modality, files in media.items():
                cmd = [sys.executable, "-c", CHILD, extra, modality, str(args.workers), *map(str, files)]
                got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                assert got["decoded"] == count, got
                times[name][modality].append(round(got["seconds"], 3))
        report = {
            "workers": args.workers,
            "files": count,
            "seconds": times,
            "median_s": {v: {m: statistics.median(t) for m, t in ms.items()} for v, ms in times.items()},
        }
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["median_s"], indent=1))


if __name__ == "__main__":
    main()
