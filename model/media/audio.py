"""Audio files -> ImageBind's [3, 1, 128, 204] log-mel clips, the same numbers as its load_and_transform_audio_data.

Decoding uses soundfile (wav/flac/ogg) and PyAV (mp3, FFmpeg's planar float32, what torchaudio's FFmpeg path
returns). Header bounds come first (model/media/bounds.py); audio longer than FULL_DECODE_SAMPLES is read clip by clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio

from model.config import AUDIO_CLIPS
from model.media.bounds import (
    FULL_DECODE_SAMPLES,
    MAX_MEDIA_SECONDS,
    MediaError,
    check_audio_header,
    check_file,
    check_finite,
    clip_timepoints,
    resample_ratio,
)

# ImageBind's preprocessing constants (load_and_transform_audio_data defaults).
SAMPLE_RATE = 16000
AUDIO_CLIP_SECONDS = 2
NUM_MEL_BINS, TARGET_FRAMES = 128, 204
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138
# Input read on each side of a clip when reading clip by clip: far beyond the resampler's reach (under 10 ms), and
# enough input that conv1d runs the same algorithm as on a whole file, so the result is bit-identical (on CPU, tested
# in tests/test_hostile_media.py; 1/8 s of context was not enough for 8 kHz mono).
CONTEXT_SECONDS = 4
# Clip-by-clip reading needs clips that do not overlap (ImageBind's in-place mean subtraction links overlapping ones):
# starts (d - 2) / 3 apart, so d >= 8 s; 9 s leaves room for rounding.
WINDOWED_MIN_SECONDS = 9

Reader = Callable[[Sequence[tuple[int, int]]], list[np.ndarray]]  # frame ranges -> [channels, n] float32 each


@dataclass(frozen=True)
class AudioInfo:
    rate: int
    channels: int
    frames: int | None  # None where the header has no exact count (mp3): counted while decoding


def audio_info(path: Path) -> AudioInfo:
    """Rate, channels and length from the header only, checked against the bounds."""
    if path.suffix.lower() == ".mp3":  # no exact length in its header; libsndfile's mp3 support varies by build
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(path, "no audio stream")
            stream = container.streams.audio[0]
            seconds = container.duration / av.time_base if container.duration else None
            info = AudioInfo(stream.rate or 0, stream.channels or 0, None)
    else:
        header = sf.info(str(path))
        info = AudioInfo(header.samplerate, header.channels, header.frames)
        seconds = header.frames / header.samplerate if header.samplerate else None
    check_audio_header(path, info.rate, info.channels, seconds)
    return info


def _read_soundfile(path: Path) -> Reader:
    def read(ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        out = []
        with sf.SoundFile(str(path)) as f:
            for start, stop in ranges:
                f.seek(start)
                out.append(np.ascontiguousarray(f.read(stop - start, dtype="float32", always_2d=True).T))
        return out

    return read


def _av_chunks(path: Path) -> Iterator[np.ndarray]:
    """[channels, n] planar float32 chunks in stream order."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                yield out.to_ndarray()
        for out in resampler.resample(None):
            yield out.to_ndarray()


def _read_av(path: Path) -> Reader:
    """Ranges by one sequential decode, keeping only their samples (FFmpeg's seeking is not sample-exact)."""

    def read(ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = [[] for _ in ranges]
        end, last = 0, max(stop for _, stop in ranges)
        with closing(_av_chunks(path)) as decoded:
            for chunk in decoded:
                begin, end = end, end + chunk.shape[1]
                for i, (start, stop) in enumerate(ranges):
                    if start < end and begin < stop:
                        parts[i].append(chunk[:, max(start - begin, 0) : stop - begin])
                if end >= last:
                    break
        return [np.concatenate(p, axis=1) for p in parts]

    return read


def _decode_av(path: Path, info: AudioInfo) -> tuple[np.ndarray | None, int]:
    """(the whole waveform, or None when it is over FULL_DECODE_SAMPLES, and the exact frame count)."""
    chunks: list[np.ndarray] | None = []
    frames = 0
    with closing(_av_chunks(path)) as decoded:
        for chunk in decoded:
            frames += chunk.shape[1]
            if frames > MAX_MEDIA_SECONDS * info.rate:
                raise MediaError(path, f"over {MAX_MEDIA_SECONDS} s long")
            if chunks is not None and frames * info.channels > FULL_DECODE_SAMPLES:
                chunks = None  # too long to keep: count on, then read the clips in a second pass
            if chunks is not None:
                chunks.append(chunk)
    if chunks is None:
        return None, frames
    return (np.concatenate(chunks, axis=1) if chunks else np.zeros((info.channels, 0), np.float32)), frames


def _by_window(info: AudioInfo) -> bool:
    frames = info.frames or 0
    return frames * info.channels > FULL_DECODE_SAMPLES and frames >= WINDOWED_MIN_SECONDS * info.rate


def _decode(path: Path) -> tuple[AudioInfo, Reader, np.ndarray | None]:
    """The checked header (with the exact frame count), a reader of frame ranges, and the whole waveform unless the
    file is to be read clip by clip (`_by_window`)."""
    info = audio_info(path)
    if info.frames is None:
        whole, frames = _decode_av(path, info)
        info, read = replace(info, frames=frames), _read_av(path)
    else:
        whole, read = None, _read_soundfile(path)
    if whole is None and not _by_window(info):
        whole = read([(0, info.frames)])[0]
    if whole is not None:
        check_finite(path, whole, "decoded samples")
    return info, read, whole


@contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """Decoder errors as one-line MediaErrors."""
    try:
        yield
    except MediaError:
        raise
    except (av.FFmpegError, RuntimeError, OSError, ValueError) as e:
        raise MediaError(path, f"unreadable audio ({e})") from e


def decode_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """The whole file as ([channels, samples] float32 in [-1, 1], sample rate), as torchaudio.load(path) does; a
    MediaError beyond the bounds, and for files load_audio reads clip by clip (over FULL_DECODE_SAMPLES)."""
    path = Path(path)
    check_file(path, "audio")
    with _unreadable(path):
        info, _, whole = _decode(path)
    if whole is None:
        raise MediaError(path, f"over {FULL_DECODE_SAMPLES} samples to decode whole")
    return torch.from_numpy(whole), info.rate


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
    # torchvision's normalize, written out (float32 mean and std, subtracted then divided, as it does): importing
    # torchvision costs a decoding process 1.4 s of its start (benchmarks/profiling/decoder_start.py)
    return (fbank.unsqueeze(0) - torch.tensor(AUDIO_MEAN)) / torch.tensor(AUDIO_STD)


def audio_clips(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[channels, samples] waveform -> [3, 1, 128, 204] normalised log-mel clips, exactly as ImageBind computes them.

    Two quirks of the original are reproduced because the released weights were trained on them:
    - Each clip's mean is subtracted in place on a *view* of the waveform. When the clips overlap (files shorter than
      8 s: clips are 2 s long and start at 0, (d-2)/3 and 2(d-2)/3), a later clip sees samples already shifted by an
      earlier clip's mean, and its own mean subtraction accounts for that. (Kaldi fbank also removes each frame's DC
      offset, so this changes results only at float-rounding level, but it is kept bit-exact.)
    - Multi-channel audio is not mixed down: the mean is taken over all channels, then kaldi fbank (channel=-1) uses
      the first channel only.
    The waveform passed in is modified (it is the in-place subtraction above). Resampling to 16 kHz is torchaudio's,
    at the ratio `resample_ratio` allows.
    """
    if waveform.numel() == 0:
        raise ValueError("empty audio")
    orig, new = resample_ratio(sample_rate, SAMPLE_RATE)
    if orig != new:
        waveform = torchaudio.functional.resample(waveform, orig_freq=orig, new_freq=new)
    min_samples = SAMPLE_RATE * 25 // 1000
    if waveform.size(1) < min_samples:
        raise ValueError(f"audio too short ({waveform.size(1)} samples at 16 kHz, need {min_samples})")
    clips = []
    for start, end in clip_timepoints(waveform.size(1) / SAMPLE_RATE, AUDIO_CLIP_SECONDS, AUDIO_CLIPS):
        view = waveform[:, int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        view -= view.mean()
        clips.append(_melspec(view))
    return torch.stack(clips)


def clips_by_window(path: Path, info: AudioInfo, read: Reader) -> torch.Tensor:
    """audio_clips of a long file (non-overlapping clips), reading only each clip's input and CONTEXT_SECONDS around
    it: the resampler's convolution (torchaudio's kernel, stride and zero padding) over that input gives the samples
    a whole-file resampling has there."""
    frames, channels = info.frames or 0, info.channels
    orig, new = resample_ratio(info.rate, SAMPLE_RATE)
    if orig == new:
        length = frames
    else:  # torchaudio's output length: ceil(new * frames / orig) in float32, at most the convolution's blocks
        length = min(int(torch.ceil(torch.as_tensor(new * frames / orig))), (frames // orig + 1) * new)
        resampler = torchaudio.transforms.Resample(orig, new, dtype=torch.float32)  # its kernel, built as functional's
        kernel, width = resampler.kernel, resampler.width
        context = math.ceil(CONTEXT_SECONDS * SAMPLE_RATE / new)
    clips = []
    for start, end in clip_timepoints(length / SAMPLE_RATE, AUDIO_CLIP_SECONDS, AUDIO_CLIPS):
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        if orig == new:
            clip = torch.from_numpy(read([(a, b)])[0])
        else:
            first, last = max(a // new - context, 0), min(-(-b // new) + context, frames // orig + 1)
            lo, hi = first * orig - width, last * orig + width
            chunk = torch.zeros(channels, hi - lo)
            chunk[:, max(lo, 0) - lo : min(hi, frames) - lo] = torch.from_numpy(
                read([(max(lo, 0), min(hi, frames))])[0]
            )
            out = torch.nn.functional.conv1d(chunk[:, None], kernel, stride=orig).transpose(1, 2).reshape(channels, -1)
            clip = out[:, a - first * new : b - first * new]
        check_finite(path, clip, "decoded samples")
        clip -= clip.mean()
        clips.append(_melspec(clip))
    return torch.stack(clips)


def load_audio(path: str | Path) -> torch.Tensor:
    """wav/mp3/flac/ogg file -> [3, 1, 128, 204] float32 (ImageBind's load_and_transform_audio_data)."""
    path = Path(path)
    check_file(path, "audio")
    with _unreadable(path):
        info, read, whole = _decode(path)
        if whole is None:
            clips = clips_by_window(path, info, read)
    if whole is not None:
        try:
            clips = audio_clips(torch.from_numpy(whole), info.rate)
        except ValueError as e:
            raise MediaError(path, str(e)) from e
    check_finite(path, clips, "log-mel features (samples out of range)")
    return clips


def probe_audio(path: Path) -> None:
    """The header's bounds and a non-empty stream, without decoding samples."""
    info = audio_info(path)
    if info.frames == 0:
        raise MediaError(path, "empty audio")
