"""What one video costs `dr infer`'s decoding (model/media/preprocess.py `load_video`, one thread, as each decoding
process runs it) for the bench's synthetic videos against videos shaped like the ones `dr data fetch` writes (up to
720p at their own frame rate, H.264): the catalog-shaped job's 229 videos are 224x224 mpeg4 at 8 frames/s of one
flat colour a frame, which decode in a few milliseconds. For each video also: all its frames decoded by PyAV alone,
and with FFmpeg skipping the frames no other frame references (`skip_frame` NONREF), what decoding only the frames
needed could save at most.

    PYTHONPATH=. python3 benchmarks/profiling/video_decode.py OUT.json [--seconds 10] [--repeats 3]

Textured videos move a noise pattern a few pixels a frame: an encoder cannot predict noise, so their bit rate (2-10
MB for 10 s) is a high one for YouTube's, and their decoding an upper estimate.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from model.media.preprocess import load_video

CLOCK = time.perf_counter
# name -> (width, height, frames a second, codec, textured)
SHAPES = {
    "bench: 224x224 8 fps mpeg4, flat": (224, 224, 8, "mpeg4", False),
    "224x224 8 fps mpeg4, textured": (224, 224, 8, "mpeg4", True),
    "640x360 25 fps mpeg4, textured": (640, 360, 25, "mpeg4", True),
    "640x360 25 fps h264, textured": (640, 360, 25, "libx264", True),
    "1280x720 30 fps h264, textured": (1280, 720, 30, "libx264", True),
}


def write_video(path: Path, width: int, height: int, fps: int, codec: str, textured: bool, seconds: float) -> None:
    """`seconds` of video: a noise pattern moving 1 pixel down and 2 right a frame, or one flat colour a frame."""
    noise = np.random.default_rng(0).integers(0, 256, (height + 64, width + 128, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(int(fps * seconds)):
            if textured:
                y, x = k % 64, 2 * k % 128
                frame = np.ascontiguousarray(noise[y : y + height, x : x + width])
            else:
                frame = np.full((height, width, 3), k * 13 % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def decode_ms(path: Path, skip: str, repeats: int) -> tuple[float, int]:
    """Milliseconds to decode every frame of the file on one thread with FFmpeg's `skip` setting, and the frames
    decoded."""
    start = CLOCK()
    for _ in range(repeats):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            stream.codec_context.skip_frame = skip
            frames = sum(1 for _ in container.decode(stream))
    return (CLOCK() - start) / repeats * 1000, frames


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/dr_video_decode")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"seconds": args.seconds, "repeats": args.repeats, "videos": {}}
    for name, (width, height, fps, codec, textured) in SHAPES.items():
        path = work / f"{width}x{height}_{fps}_{codec}_{'textured' if textured else 'flat'}.mp4"
        if not path.exists():
            write_video(path, width, height, fps, codec, textured, args.seconds)
        load_video(path)  # the first call imports and warms up
        start = CLOCK()
        for _ in range(args.repeats):
            load_video(path)
        ms = (CLOCK() - start) / args.repeats * 1000
        (every, frames), (nonref, kept) = (decode_ms(path, skip, args.repeats) for skip in ("DEFAULT", "NONREF"))
        report["videos"][name] = {
            "ms_per_video": round(ms, 1),
            "file_kib": path.stat().st_size // 1024,
            "decode_all_ms": round(every, 1),
            "frames": frames,
            "decode_skipping_nonref_ms": round(nonref, 1),
            "frames_skipping_nonref": kept,
        }
        print(
            f"{name}: {ms:.0f} ms a video, {path.stat().st_size // 1024} KiB; every frame decoded {every:.0f} ms "
            f"({frames}), the unreferenced ones skipped {nonref:.0f} ms ({kept})",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
