"""Media files -> ImageBind input tensors, numerically the same as ImageBind's own loaders (imagebind/data.py).

The released DeepResonance weights were trained on exactly those inputs, so every quirk of the original pipeline is
kept on purpose (see `audio_clips`). ImageBind's own module cannot be imported here (pytorchvideo/decord do not work
with current torchvision), so decoding uses soundfile and PyAV, and the transforms are rebuilt with PIL and torch.

This is the one entry point for media (`load_media`, `probe_media`: `dr infer`, `dr ask`, `dr data check`, `dr serve`).
Before decoding, every file is checked against the bounds named below (rate, channels, duration, pixels, aspect
ratio, frames; why each value: model/media/bounds.py), and only what ImageBind uses is decoded: 3 x 2 s of audio
(read clip by clip when long); video decoding stops at the last frame its 5 clips use and converts only their 10
frames (inter-frame codecs need the frames before them decoded). Beyond a bound, or with NaN/Inf samples or
features, a file is a one-line MediaError.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from model.config import VIDEO_CLIPS
from model.media.audio import audio_clips, decode_audio, load_audio, probe_audio  # noqa: F401 (the module's API)

# What a file may expand to, checked from its header before decoding (why each, in model/media/bounds.py):
from model.media.bounds import (  # noqa: F401 (the bounds are named here, where every loader starts)
    FULL_DECODE_SAMPLES,
    MAX_ASPECT_RATIO,
    MAX_CHANNELS,
    MAX_IMAGE_PIXELS,
    MAX_MEDIA_SECONDS,
    MAX_RESAMPLE_TAPS,
    MAX_SAMPLE_RATE,
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_PIXELS,
    MIN_SAMPLE_RATE,
    MediaError,
    check_file,
    check_seconds,
    check_size,
    clip_timepoints,
)

MODALITIES = ("audio", "image", "video")

# ImageBind's preprocessing constants (load_and_transform_{vision,video}_data defaults; audio's: model/media/audio.py).
VIDEO_CLIP_SECONDS, FRAMES_PER_CLIP = 2, 2
CROP = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_VIDEO_MEAN = torch.tensor(CLIP_MEAN)[:, None, None, None]  # broadcast over [C, T, H, W]
_VIDEO_STD = torch.tensor(CLIP_STD)[:, None, None, None]


_IMAGE_MEAN = torch.tensor(CLIP_MEAN)[:, None, None]  # [C, H, W]
_IMAGE_STD = torch.tensor(CLIP_STD)[:, None, None]


def vision_transform(rgb: Image.Image) -> torch.Tensor:
    """ImageBind's vision transform (torchvision's Resize(224, bicubic), CenterCrop(224), ToTensor, Normalize on a PIL
    image), written out with PIL and torch as torchvision computes each step, equal bit for bit (tests/test_media.py):
    importing torchvision cost each decoding process 1.4 s at its first image
    (benchmarks/results/2026-12-06-cpu-decoder-start/), on every core of a job's pool at once."""
    w, h = rgb.size
    short, long = (w, h) if w <= h else (h, w)
    stretched = int(CROP * long / short)  # the long side, truncated
    size = (CROP, stretched) if w <= h else (stretched, CROP)
    if size != (w, h):
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = round((size[0] - CROP) / 2), round((size[1] - CROP) / 2)  # halves to even, as torchvision's
    if size != (CROP, CROP):
        rgb = rgb.crop((left, top, left + CROP, top + CROP))
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels.float().div(255).sub_(_IMAGE_MEAN).div_(_IMAGE_STD)


def load_image(path: str | Path) -> torch.Tensor:
    """Image file -> [3, 224, 224] float32: RGB, bicubic short side 224, centre crop, CLIP mean/std."""
    path = Path(path)
    check_file(path, "image")
    try:
        with Image.open(path) as img:
            check_size(path, *img.size, MAX_IMAGE_PIXELS)  # from the header: nothing is decoded yet
            rgb = img.convert("RGB")
    except MediaError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"unreadable image ({e})") from e
    return vision_transform(rgb)


def _frame_count(path: Path, container: av.container.InputContainer, stream: av.VideoStream, fps: float) -> int:
    """The stream's frame count (the header's, else its packets, as a demuxer-built index counts), within bounds."""
    count = stream.frames
    if not count:
        check_seconds(path, container.duration / av.time_base if container.duration else None)
        count = 0
        for packet in container.demux(stream):
            count += bool(packet.size)
            if count > MAX_VIDEO_FRAMES:
                break
        container.seek(0)
    if count > MAX_VIDEO_FRAMES:
        raise MediaError(path, f"over {MAX_VIDEO_FRAMES} video frames")
    check_seconds(path, count / fps)
    return count


def _video_frames(path: Path) -> np.ndarray:
    """Decode the RGB frames ImageBind samples, in clip order, 2 per clip: [10, H, W, 3] uint8 (bit-identical to
    decord's, checked).

    Frame size and count are checked from the container before decoding, each decoded frame's size again, and
    decoding stops at the last frame a clip uses; only those frames are converted to RGB, by one converter on one
    thread (PyAV's `to_ndarray` builds a converter, with a pool of one thread per core, for every frame: 10x slower
    on 2 cores, same pixels). The decoder also runs on one thread: a job decodes many files at once, one per core."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if stream.codec_context.width or stream.codec_context.height:
            check_size(path, stream.codec_context.width, stream.codec_context.height, MAX_VIDEO_PIXELS)
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise MediaError(path, "unknown frame rate")
        fps = float(rate)
        count = _frame_count(path, container, stream, fps)
        if count == 0:
            raise MediaError(path, "no video frames")
        wanted = []
        for start, end in clip_timepoints(count / fps, VIDEO_CLIP_SECONDS, VIDEO_CLIPS):
            first, stop = math.ceil(fps * start), min(math.ceil(fps * end), count)
            if stop <= first:
                raise MediaError(path, f"no frames in clip [{float(start):.3f}, {float(end):.3f}) s")
            # pytorchvideo's UniformTemporalSubsample(2): linspace(0, t-1, 2) -> first and last frame of the clip.
            idx = torch.linspace(0, stop - first - 1, FRAMES_PER_CLIP).clamp(0, stop - first - 1).long()
            wanted += [first + int(i) for i in idx]
        decoded: dict[int, np.ndarray] = {}
        needed, last = set(wanted), max(wanted)
        converter = VideoReformatter()
        for i, frame in enumerate(container.decode(stream)):
            check_size(path, frame.width, frame.height, MAX_VIDEO_PIXELS)
            if i in needed:
                decoded[i] = converter.reformat(frame, format="rgb24", threads=1).to_ndarray()
            if i >= last:
                break
    missing = sorted(needed - decoded.keys())
    if missing:
        raise MediaError(path, f"decoded fewer frames than the container lists ({count}); frame {missing[0]} missing")
    if len({f.shape for f in decoded.values()}) > 1:
        raise MediaError(path, "the frame size changes within the video")
    return np.stack([decoded[i] for i in wanted])


def _short_side_scale(clips: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo's ShortSideScale: bilinear (align_corners=False) on [..., H, W], other side floor-scaled.

    At the same size bilinear weighs each source pixel 1 and its neighbour 0, so the input is returned as it is."""
    h, w = clips.shape[-2:]
    new_h, new_w = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
    if (new_h, new_w) == (h, w):
        return clips
    flat = clips.reshape(-1, *clips.shape[-3:])
    scaled = torch.nn.functional.interpolate(flat, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return scaled.reshape(*clips.shape[:-2], new_h, new_w)


def _three_crops(clip: torch.Tensor, size: int) -> list[torch.Tensor]:
    """ImageBind's SpatialCrop(num_crops=3): start, centre, end crops along the longer side of [C, T, H, W]."""
    h, w = clip.shape[2], clip.shape[3]
    y, x = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    if h > w:
        offsets = [(0, x), (y, x), (h - size, x)]
    else:
        offsets = [(y, 0), (y, x), (y, w - size)]
    return [clip[:, :, oy : oy + size, ox : ox + size] for oy, ox in offsets]


def load_video(path: str | Path) -> torch.Tensor:
    """Video file -> [15, 3, 2, 224, 224] float32 (ImageBind's load_and_transform_video_data).

    5 clips of 2 s (ConstantClipsPerVideoSampler over frame count / average fps, as its decord reader measures the
    duration), the first and last frame of each clip, /255, short side to 224 (bilinear), CLIP mean/std, then three
    224 crops per clip; output order is clip-major (clip0 crops 0-2, clip1 crops 0-2, ...).
    """
    path = Path(path)
    check_file(path, "video")
    try:
        frames = _video_frames(path)
    except MediaError:
        raise
    except (av.FFmpegError, RuntimeError, OSError, ValueError) as e:
        raise MediaError(path, f"unreadable video ({e})") from e
    clips = torch.from_numpy(frames).reshape(-1, FRAMES_PER_CLIP, *frames.shape[1:])  # [clip, T, H, W, C]
    clips = clips.permute(0, 4, 1, 2, 3).contiguous().to(torch.float32).div_(255.0)  # [clip, C, T, H, W]
    clips = _short_side_scale(clips, CROP).sub_(_VIDEO_MEAN).div_(_VIDEO_STD)
    return torch.stack([crop for clip in clips for crop in _three_crops(clip, CROP)])


_LOADERS = {"audio": load_audio, "image": load_image, "video": load_video}


def probe_media(modality: str, path: str | Path) -> None:
    """Cheap readability check (the header and stream list, and the bounds on them); raises MediaError like the
    loaders.

    It does not decode samples, so a file truncated mid-stream passes here and fails in load_media.
    """
    path = Path(path)
    if modality not in _LOADERS:
        raise ValueError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    check_file(path, modality)
    try:
        if modality == "image":
            with Image.open(path) as img:
                check_size(path, *img.size, MAX_IMAGE_PIXELS)
                img.verify()
        elif modality == "audio":
            probe_audio(path)
        else:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise MediaError(path, "no video stream")
                context = container.streams.video[0].codec_context
                if context.width or context.height:
                    check_size(path, context.width, context.height, MAX_VIDEO_PIXELS)
                check_seconds(path, container.duration / av.time_base if container.duration else None)
    except MediaError:
        raise
    except (av.FFmpegError, RuntimeError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"unreadable {modality} ({e})") from e


def load_media(modality: str, path: str | Path) -> torch.Tensor:
    """Dispatch on modality ("audio", "image" or "video")."""
    if modality not in _LOADERS:
        raise ValueError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    return _LOADERS[modality](path)
