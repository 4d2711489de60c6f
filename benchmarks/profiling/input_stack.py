"""What a GPU job's loader spends stacking one encoder call's decoded inputs (model/media/encoding.py `Queued.call`),
per kind at its CALL_FILES files, with the inputs in float32 (as the decoding processes sent them until 2026-12-07's
sixth session) and in the encoder's bfloat16 (since: model/media/decoders.py `find_chunk`), each from fresh shared
memory as a chunk arrives (its pages touched for the first time); and what the conversion costs a decoding process
a file. One intra-op thread, as the loader's stacking and a decoding process run.

    PYTHONPATH=. python benchmarks/profiling/input_stack.py OUT.json [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.profiling.encoder_batch import one_input
from model.media.encoder import CALL_FILES

CLOCK = time.perf_counter


def stack_ms(chunk: torch.Tensor, repeats: int) -> float:
    """The median milliseconds of stacking the chunk's files, each time from a fresh shared-memory copy of it (made
    outside the clock)."""
    times = []
    for _ in range(repeats):
        files = list(chunk.contiguous().share_memory_())
        start = CLOCK()
        torch.stack(files)
        times.append(CLOCK() - start)
    return round(1000 * statistics.median(times), 2)


def convert_ms(x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = CLOCK()
        x.to(torch.bfloat16)
        times.append(CLOCK() - start)
    return round(1000 * statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"threads": 1, "kinds": {}}
    with tempfile.TemporaryDirectory() as folder:
        for modality in ("audio", "image", "video"):
            x, files = one_input(Path(folder), modality), CALL_FILES[modality]
            kind: dict = {"files": files}
            for dtype in (torch.float32, torch.bfloat16):
                chunk = x.to(dtype).unsqueeze(0).expand(files, *x.shape)
                kind[str(dtype).removeprefix("torch.")] = {
                    "mb": round(chunk.numel() * chunk.element_size() / 2**20, 1),
                    "stack_ms": stack_ms(chunk, args.repeats),
                }
            kind["convert_a_file_ms"] = convert_ms(x, args.repeats)
            report["kinds"][modality] = kind
            print(modality, json.dumps(kind), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
