"""What decoding the catalog mix's media costs per kind, on one process with one intra-op thread (as each of a job's
decoding processes runs it: model/media/decoders.py), and where a video's time goes.

Writes `dr bench job`'s catalog media (benchmarks/job_workload.py: a wav per row, a PNG beside it in the "mi2t" rows,
an mp4 in the "mv2t" rows) into a temporary folder, then times every file through the job's own path from file to
ImageBind input (model/media/decoders.py's load_or_error -> preprocess.load_media): ms per file, files/s and each
kind's share of the mix's decoding time. Then a video's steps one by one, as preprocess.load_video takes them
(opening and counting, decoding up to the last frame a clip uses, converting the 10 used frames to RGB both through
PyAV's `to_ndarray` and through one single-threaded converter per file, the float transform), and an image's.

    PYTHONPATH=. python benchmarks/profiling/media_mix.py --rows 200
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from benchmarks.job_workload import mix_rows, write_media
from model.config import VIDEO_CLIPS
from model.media import preprocess
from model.media.decoders import load_or_error


def timed(run: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def per_kind(files: dict[str, list[Path]], passes: int) -> dict[str, float]:
    """Seconds per file of each kind through load_or_error (best of `passes` passes over all its files)."""
    cost = {}
    for kind, paths in files.items():
        load_or_error(kind, paths[0])  # imports and first-call set-up out of the timing
        best = math.inf
        for _ in range(passes):
            seconds, out = timed(lambda: [load_or_error(kind, p) for p in paths])  # noqa: B023
            best = min(best, seconds)
        errors = [o for o in out if not isinstance(o, torch.Tensor)]
        if errors:
            raise SystemExit(f"{kind}: {errors[0]}")
        cost[kind] = best / len(paths)
    return cost


def wanted_frames(count: int, fps: float) -> list[int]:
    """The frame indices load_video keeps, as it computes them (clip order, first and last frame of each clip)."""
    wanted = []
    for start, end in preprocess.clip_timepoints(count / fps, preprocess.VIDEO_CLIP_SECONDS, VIDEO_CLIPS):
        first, stop = math.ceil(fps * start), min(math.ceil(fps * end), count)
        wanted += [first, stop - 1]
    return wanted


def video_steps(path: Path) -> dict[str, float]:
    """One video's steps, each timed alone (seconds)."""
    steps = {}
    start = time.perf_counter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        count = stream.frames
        steps["open + header + frame count"] = time.perf_counter() - start
        wanted = wanted_frames(count, fps)
        frames_to_last = itertools.islice(container.decode(stream), max(wanted) + 1)
        seconds, frames = timed(lambda: list(frames_to_last))
        steps[f"decode frames 0..{max(wanted)} of {count}"] = seconds
    used = [frames[i] for i in wanted]
    steps["rgb24: frame.to_ndarray per frame"], rgb = timed(lambda: [f.to_ndarray(format="rgb24") for f in used])
    converter = VideoReformatter()
    steps["rgb24: one converter, 1 thread"], _ = timed(
        lambda: [converter.reformat(f, format="rgb24", threads=1).to_ndarray() for f in used]
    )
    clips = []
    mean = torch.tensor(preprocess.CLIP_MEAN)[:, None, None, None]
    std = torch.tensor(preprocess.CLIP_STD)[:, None, None, None]

    def to_float() -> list[torch.Tensor]:
        return [
            torch.from_numpy(np.stack(rgb[i : i + 2])).to(torch.float32).permute(3, 0, 1, 2).contiguous() / 255.0
            for i in range(0, len(rgb), 2)
        ]

    steps["uint8 -> float [C,T,H,W] / 255"], clips = timed(to_float)
    steps["short side scale (bilinear)"], clips = timed(
        lambda: [preprocess._short_side_scale(c, preprocess.CROP) for c in clips]
    )
    steps["normalise (mean/std)"], clips = timed(lambda: [(c - mean) / std for c in clips])
    steps["3 crops + stack [15,3,2,224,224]"], _ = timed(
        lambda: torch.stack([x for c in clips for x in preprocess._three_crops(c, preprocess.CROP)])
    )
    return steps


def image_steps(path: Path) -> dict[str, float]:
    steps = {}
    seconds, rgb = timed(lambda: Image.open(path).convert("RGB"))
    steps["open + decode + RGB"] = seconds
    transform = preprocess._IMAGE_TRANSFORM.transforms
    x = rgb
    for t in transform:
        seconds, x = timed(lambda t=t, x=x: t(x))
        steps[type(t).__name__] = seconds
    return steps


def mean_steps(step: Callable[[Path], dict[str, float]], paths: list[Path]) -> dict[str, float]:
    step(paths[0])
    runs = [step(p) for p in paths]
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="media length (dr bench job's default)")
    parser.add_argument("--passes", type=int, default=3, help="passes over the files; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, _ = mix_rows(args.rows, "catalog")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_media(folder, data, args.seconds)
        files: dict[str, list[Path]] = {}
        for row in data:
            for kind, name in zip(row.mm_names, row.mm_paths, strict=True):
                files.setdefault(kind, []).append(folder / name)
        cost = per_kind(files, args.passes)
        total = sum(cost[k] * len(files[k]) for k in files)
        print(f"catalog mix, {args.rows} rows, {args.seconds:g} s media, 1 process, torch intra-op threads 1")
        print(f"{'kind':6s} {'files':>6s} {'ms/file':>9s} {'files/s':>9s} {'share of decode time':>21s}")
        for kind in ("audio", "image", "video"):
            n = len(files.get(kind, []))
            if n:
                print(f"{kind:6s} {n:6d} {1000 * cost[kind]:9.2f} {1 / cost[kind]:9.1f} {cost[kind] * n / total:20.1%}")
        print(f"all    {sum(map(len, files.values())):6d} files: {total:.2f} s of decoding for the {args.rows} rows")
        for label, step, kind in (("video", video_steps, "video"), ("image", image_steps, "image")):
            steps = mean_steps(step, files[kind])
            print(f"\n{label} steps, ms per file (mean over {len(files[kind])} files, each step timed alone):")
            for name, seconds in steps.items():
                print(f"  {name:40s} {1000 * seconds:7.2f}")


if __name__ == "__main__":
    main()
