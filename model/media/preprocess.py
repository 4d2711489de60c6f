"""Media files -> ImageBind input tensors, numerically the same as ImageBind's own loaders (imagebind/data.py).

The released DeepResonance weights were trained on exactly those inputs, so every quirk of the original pipeline is
kept on purpose (see `audio_clips`). ImageBind's own module cannot be imported here (pytorchvideo/decord do not work
with current torchvision), so decoding uses soundfile and PyAV, and the transforms are rebuilt with torch/torchvision.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from model.config import AUDIO_CLIPS, VIDEO_CLIPS

MODALITIES = ("audio", "image", "video")
AUDIO_EXTS = frozenset({".wav", ".mp3", ".flac", ".ogg"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"})
EXTENSIONS = {"audio": AUDIO_EXTS, "image": IMAGE_EXTS, "video": VIDEO_EXTS}

# ImageBind's preprocessing constants (load_and_transform_{audio,vision,video}_data defaults).
SAMPLE_RATE = 16000
AUDIO_CLIP_SECONDS = 2
NUM_MEL_BINS, TARGET_FRAMES = 128, 204
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138
VIDEO_CLIP_SECONDS, FRAMES_PER_CLIP = 2, 2
CROP = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_IMAGE_TRANSFORM = transforms.Compose(
    [
        transforms.Resize(CROP, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(CROP),
        transforms.ToTensor(),
        transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
    ]
)


class MediaError(ValueError):
    """A media file that cannot become encoder input; the message is one line, `path: reason`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


def _check_file(path: Path, modality: str) -> None:
    if path.suffix.lower() not in EXTENSIONS[modality]:
        allowed = ", ".join(sorted(EXTENSIONS[modality]))
        raise MediaError(path, f"unsupported {modality} extension {path.suffix or '(none)'!r} (expected {allowed})")
    if not path.is_file():
        raise MediaError(path, "no such file")


def clip_timepoints(duration: float, clip_seconds: int, num_clips: int) -> list[tuple[Fraction, Fraction]]:
    """(start, end) seconds of pytorchvideo's ConstantClipsPerVideoSampler, as ImageBind iterates it.

    Starts are k * max(duration - clip_seconds, 0) / num_clips for k < num_clips, in exact Fractions of the float
    duration (the last clip does not reach the end of the file). The sampler's "end of video reached" stop can never
    fire with these starts, so there are always num_clips clips; for short files they coincide at [0, clip_seconds].
    """
    step = Fraction(max(duration - clip_seconds, 0)) / num_clips
    return [(step * k, step * k + clip_seconds) for k in range(num_clips)]


def _decode_audio_soundfile(path: Path) -> tuple[torch.Tensor, int]:
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr


def _decode_audio_av(path: Path) -> tuple[torch.Tensor, int]:
    """FFmpeg decoding to planar float32 (what torchaudio's FFmpeg path returns for compressed audio)."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray() for out in resampler.resample(None)]
        sr = stream.rate
    if not chunks:
        return torch.zeros(1, 0), sr
    return torch.from_numpy(np.concatenate(chunks, axis=1)), sr


def decode_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """Decode to ([channels, samples] float32 in [-1, 1], sample rate), as torchaudio.load(path) does."""
    path = Path(path)
    _check_file(path, "audio")
    try:
        if path.suffix.lower() == ".mp3":
            return _decode_audio_av(path)
        return _decode_audio_soundfile(path)
    except MediaError:
        raise
    except (av.FFmpegError, RuntimeError, OSError, ValueError) as e:
        raise MediaError(path, f"unreadable audio ({e})") from e


def _melspec(clip: torch.Tensor) -> torch.Tensor:
    fbank = torchaudio.compliance.kaldi.fbank(
        clip,
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=NUM_MEL_BINS,
        dither=0.0,
        frame_length=25,
        frame_shift=10,
    ).t()
    pad = TARGET_FRAMES - fbank.size(1)
    fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :TARGET_FRAMES]
    return TF.normalize(fbank.unsqueeze(0), mean=[AUDIO_MEAN], std=[AUDIO_STD])


def audio_clips(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[channels, samples] waveform -> [3, 1, 128, 204] normalised log-mel clips, exactly as ImageBind computes them.

    Two quirks of the original are reproduced because the released weights were trained on them:
    - Each clip's mean is subtracted in place on a *view* of the waveform. When the clips overlap (files shorter than
      8 s: clips are 2 s long and start at 0, (d-2)/3 and 2(d-2)/3), a later clip sees samples already shifted by an
      earlier clip's mean, and its own mean subtraction accounts for that. (Kaldi fbank also removes each frame's DC
      offset, so this changes results only at float-rounding level, but it is kept bit-exact.)
    - Multi-channel audio is not mixed down: the mean is taken over all channels, then kaldi fbank (channel=-1) uses
      the first channel only.
    The waveform passed in is modified (it is the in-place subtraction above).
    """
    if waveform.numel() == 0:
        raise ValueError("empty audio")
    if sample_rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, orig_freq=sample_rate, new_freq=SAMPLE_RATE)
    min_samples = SAMPLE_RATE * 25 // 1000
    if waveform.size(1) < min_samples:
        raise ValueError(f"audio too short ({waveform.size(1)} samples at 16 kHz, need {min_samples})")
    clips = []
    for start, end in clip_timepoints(waveform.size(1) / SAMPLE_RATE, AUDIO_CLIP_SECONDS, AUDIO_CLIPS):
        view = waveform[:, int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        view -= view.mean()
        clips.append(_melspec(view))
    return torch.stack(clips)


def load_audio(path: str | Path) -> torch.Tensor:
    """wav/mp3/flac/ogg file -> [3, 1, 128, 204] float32 (ImageBind's load_and_transform_audio_data)."""
    waveform, sr = decode_audio(path)
    try:
        return audio_clips(waveform, sr)
    except ValueError as e:
        raise MediaError(path, str(e)) from e


def load_image(path: str | Path) -> torch.Tensor:
    """Image file -> [3, 224, 224] float32: RGB, bicubic short side 224, centre crop, CLIP mean/std."""
    path = Path(path)
    _check_file(path, "image")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"unreadable image ({e})") from e
    return _IMAGE_TRANSFORM(rgb)


def _video_frames(path: Path) -> list[np.ndarray]:
    """Decode the RGB frames ImageBind samples, in clip order, 2 per clip (bit-identical to decord's, checked)."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise MediaError(path, "unknown frame rate")
        fps = float(rate)
        count = stream.frames
        if not count:  # no frame count in the header: count packets, as a demuxer-built index would
            count = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
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
        needed = set(wanted)
        for i, frame in enumerate(container.decode(stream)):
            if i in needed:
                decoded[i] = frame.to_ndarray(format="rgb24")
            if i >= max(needed):
                break
    missing = sorted(needed - decoded.keys())
    if missing:
        raise MediaError(path, f"decoded fewer frames than the container lists ({count}); frame {missing[0]} missing")
    return [decoded[i] for i in wanted]


def _short_side_scale(clip: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo's ShortSideScale: bilinear (align_corners=False) on [C, T, H, W], other side floor-scaled."""
    _, _, h, w = clip.shape
    new_h, new_w = (int(math.floor(h / w * size)), size) if w < h else (size, int(math.floor(w / h * size)))
    return torch.nn.functional.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)


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
    _check_file(path, "video")
    try:
        frames = _video_frames(path)
    except MediaError:
        raise
    except (av.FFmpegError, RuntimeError, OSError, ValueError) as e:
        raise MediaError(path, f"unreadable video ({e})") from e
    mean = torch.tensor(CLIP_MEAN)[:, None, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None, None]
    crops = []
    for i in range(0, len(frames), FRAMES_PER_CLIP):
        clip = torch.from_numpy(np.stack(frames[i : i + FRAMES_PER_CLIP])).to(torch.float32)
        clip = clip.permute(3, 0, 1, 2).contiguous() / 255.0  # [T, H, W, C] -> [C, T, H, W]
        clip = (_short_side_scale(clip, CROP) - mean) / std
        crops += _three_crops(clip, CROP)
    return torch.stack(crops)


_LOADERS = {"audio": load_audio, "image": load_image, "video": load_video}


def probe_media(modality: str, path: str | Path) -> None:
    """Cheap readability check (open the file, read its header and stream list); raises MediaError like the loaders.

    It does not decode samples, so a file truncated mid-stream passes here and fails in load_media.
    """
    path = Path(path)
    if modality not in _LOADERS:
        raise ValueError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    _check_file(path, modality)
    try:
        if modality == "image":
            with Image.open(path) as img:
                img.verify()
        elif modality == "audio" and path.suffix.lower() != ".mp3":
            if sf.info(str(path)).frames == 0:
                raise MediaError(path, "empty audio")
        else:
            with av.open(str(path)) as container:
                if not (container.streams.audio if modality == "audio" else container.streams.video):
                    raise MediaError(path, f"no {modality} stream")
    except MediaError:
        raise
    except (av.FFmpegError, RuntimeError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"unreadable {modality} ({e})") from e


def load_media(modality: str, path: str | Path) -> torch.Tensor:
    """Dispatch on modality ("audio", "image" or "video")."""
    if modality not in _LOADERS:
        raise ValueError(f"unknown modality {modality!r} (expected one of {', '.join(MODALITIES)})")
    return _LOADERS[modality](path)
