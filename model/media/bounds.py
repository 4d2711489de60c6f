"""How much a media file may expand to, checked from its header before anything is decoded, and MediaError.

A few bytes can claim gigabytes: a 244-byte WAV at 655 kHz, a 99-byte 1x10000 PNG, minutes of 4096x4096 h264. Every
loader (model/media/preprocess.py's load_media and probe_media, used by `dr infer`, `dr ask`, `dr data check` and
`dr serve` alike) checks these bounds first and refuses beyond them with one line. The numbers:

- MIN_SAMPLE_RATE..MAX_SAMPLE_RATE (1 kHz..192 kHz): the rates real recorders and codecs use.
- MAX_CHANNELS (8): 7.1 surround.
- MAX_MEDIA_SECONDS (1 h), audio and video, from the header (and, for audio, counted again while decoding).
- FULL_DECODE_SAMPLES (2**24 samples x channels, 64 MB as float32): audio up to this is decoded whole; longer audio
  is read clip by clip (only the 3 x 2 s ImageBind uses, with context for the resampler), so a 1 h file at 192 kHz x
  8 channels costs about what 10 s does. The outputs are the same as decoding it whole.
- MAX_RESAMPLE_TAPS (2**20): torchaudio's resampling kernel has (16000 / g) x (rate / g + 2 x width) taps for
  g = gcd(rate, 16000), so a rate like 16001 Hz builds 256 M taps (4 GB). Rates whose kernel is larger are resampled
  at the nearest ratio with a denominator of at most RESAMPLE_DENOMINATOR (256): 16001 Hz is read as 16000 Hz, an
  error of 0.006 %; common rates (8, 11.025, 16, 22.05, 32, 44.1, 48, 96 kHz) are resampled exactly as before.
- MAX_IMAGE_PIXELS (36 M, e.g. 8K UHD), MAX_VIDEO_PIXELS (3840 x 2160 per frame) and MAX_ASPECT_RATIO (10, long side
  over short side: ImageBind scales the short side to 224, so a 1x10000 image would become 224 x 2,240,000).
- MAX_VIDEO_FRAMES (216,000: 1 h at 60 fps), from the header or the demuxed packets, before decoding.
"""

from __future__ import annotations

import math
import stat
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 192_000
MAX_CHANNELS = 8
MAX_MEDIA_SECONDS = 3600
FULL_DECODE_SAMPLES = 1 << 24
MAX_RESAMPLE_TAPS = 1 << 20
RESAMPLE_DENOMINATOR = 256
MAX_IMAGE_PIXELS = 36_000_000
MAX_VIDEO_PIXELS = 3840 * 2160
MAX_ASPECT_RATIO = 10
MAX_VIDEO_FRAMES = 216_000

AUDIO_EXTS = frozenset({".wav", ".mp3", ".flac", ".ogg"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"})
EXTENSIONS = {"audio": AUDIO_EXTS, "image": IMAGE_EXTS, "video": VIDEO_EXTS}


class MediaError(ValueError):
    """A media file that cannot become encoder input; the message is one line, `path: reason`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple:
        """Pickled as (path, reason): it comes back from decoding processes (model/media/decoders.py)."""
        return type(self), (self.path, self.reason)


def check_file(path: Path, modality: str) -> None:
    """A known media extension and a regular file, checked before anything opens it: a device (/dev/zero), a FIFO
    or a directory would block or never end."""
    if path.suffix.lower() not in EXTENSIONS[modality]:
        allowed = ", ".join(sorted(EXTENSIONS[modality]))
        raise MediaError(path, f"unsupported {modality} extension {path.suffix or '(none)'!r} (expected {allowed})")
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise MediaError(path, "no such file") from e
    if not stat.S_ISREG(mode):
        raise MediaError(path, "not a regular file")


def check_audio_header(path: Path, rate: float, channels: int, seconds: float | None) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE or rate != int(rate):
        raise MediaError(path, f"sample rate {rate:g} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise MediaError(path, f"{channels} audio channels (at most {MAX_CHANNELS})")
    check_seconds(path, seconds)


def check_seconds(path: Path, seconds: float | None) -> None:
    if seconds is not None and seconds > MAX_MEDIA_SECONDS:
        raise MediaError(path, f"{seconds:.0f} s long (at most {MAX_MEDIA_SECONDS} s)")


def check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    """Width x height (from a header, before decoding) within max_pixels and MAX_ASPECT_RATIO."""
    if width < 1 or height < 1:
        raise MediaError(path, f"{width}x{height} pixels")
    if width * height > max_pixels:
        raise MediaError(path, f"{width}x{height} pixels is over {max_pixels:,}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise MediaError(path, f"{width}x{height} pixels is more elongated than {MAX_ASPECT_RATIO}:1")


def check_finite(path: Path, values: np.ndarray | torch.Tensor, what: str) -> None:
    """NaN or Inf in decoded samples or computed features would reach the model's cache and answers: refuse them."""
    finite = np.isfinite(values).all() if isinstance(values, np.ndarray) else torch.isfinite(values).all()
    if not finite:
        raise MediaError(path, f"{what} are not finite (NaN or Inf)")


def resample_ratio(rate: int, target: int) -> tuple[int, int]:
    """(orig, new) for torchaudio's resampler: rate/target reduced, or its nearest fraction with a denominator of at
    most RESAMPLE_DENOMINATOR where the exact kernel would have more than MAX_RESAMPLE_TAPS taps."""
    exact = Fraction(rate, target)
    orig, new = exact.numerator, exact.denominator
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))  # torchaudio's, with lowpass_filter_width 6, rolloff 0.99
    if new * (orig + 2 * width) <= MAX_RESAMPLE_TAPS:
        return orig, new
    near = exact.limit_denominator(RESAMPLE_DENOMINATOR)
    return near.numerator, near.denominator


def clip_timepoints(duration: float, clip_seconds: int, num_clips: int) -> list[tuple[Fraction, Fraction]]:
    """(start, end) seconds of pytorchvideo's ConstantClipsPerVideoSampler, as ImageBind iterates it: what of a file
    is read.

    Starts are k * max(duration - clip_seconds, 0) / num_clips for k < num_clips, in exact Fractions of the float
    duration (the last clip does not reach the end of the file). The sampler's "end of video reached" stop can never
    fire with these starts, so there are always num_clips clips; for short files they coincide at [0, clip_seconds].
    """
    step = Fraction(max(duration - clip_seconds, 0)) / num_clips
    return [(step * k, step * k + clip_seconds) for k in range(num_clips)]
