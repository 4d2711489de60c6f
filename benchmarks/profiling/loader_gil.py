"""A job's media loader beside a stand-in for the engine's loop, with its host work in the job's process (the code
before 2026-12-07's fifth session: hashing, cache reads and feature-file writes on threads of the job's process,
decoding in processes) or all of it in the decoding processes (the code since), each tree in interpreters of its
own, the trees taking turns.

A group of ten-second wavs goes through `look_up`, decoding and `encode_misses` with a stand-in encoder (random
[B, 3, 1024] features: no GPU) and its stores, three ways: cold (nothing cached), warm (every file's features cached
and its digest remembered on disk: a second checkpoint on the same set) and warm with the digests forgotten (the
features cached, the memo gone: every file hashed and its entry read). The engine's loop is stood in for as in
gil_hashing.py: 1 ms of pure-Python work holding the interpreter lock, then a 0.5 ms wait releasing it. Reported:
files a second through the loader, and the loop's turns a second and its 99th-percentile turn.

    PYTHONPATH=.:tests python3 benchmarks/profiling/loader_gil.py OUT.json --before .dev/old [--files 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, threading, time
from pathlib import Path
import torch
from model.media import features
from model.media.decoders import DecodeProcesses
try:
    from model.media.encoding import encode_misses
except ImportError:  # a tree from before 2026-12-07's sixth session
    encode_misses = features.encode_misses

root, workers, paths = Path(sys.argv[1]), int(sys.argv[2]), [Path(p) for p in sys.argv[3:]]


class Encoder:
    fingerprint, device, dtype = "bench-v1", torch.device("cpu"), torch.float32

    def state_dict(self):
        return {}

    def weights_file(self):
        return None

    def embed(self, modality, inputs):
        return torch.randn(inputs.shape[0], 3, 1024)

    __call__ = embed  # an older tree's encode_misses calls the encoder


def loop(stop, turns):
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < 0.001:
            sum(range(200))
        time.sleep(0.0005)
        turns.append(time.perf_counter() - start)


cache = features.FeatureCache(root, Encoder.fingerprint)
with DecodeProcesses(workers) as decoders:
    decoders.starting.join()
    stop, turns = threading.Event(), []
    engine = threading.Thread(target=loop, args=(stop, turns))
    engine.start()
    start = time.perf_counter()
    if hasattr(features, "LookupInProcesses"):  # the host work in the decoding processes
        from model.media.feature_stores import ProcessStores

        lookup, inputs = features.LookupInProcesses(decoders, cache, "audio", paths).result()
        stores = ProcessStores(decoders)
        encode_misses(Encoder(), cache, lookup, lambda a, b: inputs[a:b], 64, 2, stores)
        stores.wait()
    else:  # hashing, reads and writes on threads of this process
        lookup = features.look_up(cache, "audio", paths, 2)
        inputs = decoders("audio", lookup.first_paths()) if lookup.misses else []
        encode_misses(Encoder(), cache, lookup, lambda a, b: inputs[a:b], 64, 2)
    cache.hashes.save()
    seconds = time.perf_counter() - start
    stop.set()
    engine.join()
turns.sort()
print(json.dumps({
    "seconds": round(seconds, 3),
    "files_per_s": round(len(paths) / seconds, 1),
    "misses": len(lookup.misses),
    "loop_turns_per_s": round(len(turns) / seconds, 1),
    "loop_turn_ms_p99": round(turns[int(0.99 * (len(turns) - 1))] * 1000, 3),
}))
"""
SCENARIOS = ("cold", "warm, digests forgotten", "warm")


def run(tree: Path, cache: Path, workers: int, paths: list[Path]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'tests'}", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", CHILD, str(cache), str(workers), *map(str, paths)]
    done = subprocess.run(args, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--before", type=Path, required=True, help="a copy of the code before the change")
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dr_loader_gil"))
    args = parser.parse_args()
    sys.path.insert(0, "tests")
    import synth

    media = args.dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    paths = [media / f"{i}.wav" for i in range(args.files)]
    for i, p in enumerate(paths):
        if not p.exists():
            synth.write_wav(p, 10.0, 200.0 + i)
    trees = {"host work in the job's process (before)": args.before.resolve(), "in the decoding processes": Path.cwd()}
    results: dict[str, dict[str, list[dict]]] = {t: {s: [] for s in SCENARIOS} for t in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            cache = args.dir / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            for scenario in SCENARIOS:
                if scenario == "warm, digests forgotten":
                    (cache / "file-hashes.json").unlink(missing_ok=True)
                results[name][scenario].append(run(tree, cache, args.workers, paths))
                print(name, scenario, results[name][scenario][-1], flush=True)
        summary = {
            t: {s: statistics.median(r["files_per_s"] for r in runs) for s, runs in by.items() if runs}
            for t, by in results.items()
        }
        report = {"files": args.files, "workers": args.workers, "cores": os.cpu_count(), "median_files_per_s": summary}
        args.out.write_text(json.dumps({**report, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
