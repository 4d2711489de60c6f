"""Tiny synthesized media and datasets for tests: no downloads, a few KB each, made in milliseconds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image


def tone(seconds: float, freq: float = 440.0, sr: int = 16000, channels: int = 1) -> np.ndarray:
    """A sine (plus a small offset so mean subtraction matters), shape [samples, channels], float32 in [-1, 1].

    Channel c is detuned by 1.5**c so channel handling is observable."""
    t = np.arange(int(round(seconds * sr))) / sr
    cols = [0.5 * np.sin(2 * np.pi * freq * 1.5**c * t) + 0.1 for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def _write_soundfile(path: Path, seconds: float, freq: float, sr: int, channels: int, **kwargs) -> Path:
    """PCM files get the same int16 samples whatever the container (libsndfile's float->int scaling differs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = tone(seconds, freq, sr, channels)
    if kwargs.get("subtype") == "PCM_16":
        samples = np.round(samples * 32767).astype(np.int16)
    sf.write(path, samples, sr, **kwargs)
    return path


def write_wav(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 16000, channels: int = 1) -> Path:
    """16-bit PCM wav."""
    return _write_soundfile(path, seconds, freq, sr, channels, subtype="PCM_16")


def write_flac(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 16000, channels: int = 1) -> Path:
    return _write_soundfile(path, seconds, freq, sr, channels, subtype="PCM_16")


def write_ogg(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 16000, channels: int = 1) -> Path:
    """Ogg Vorbis."""
    return _write_soundfile(path, seconds, freq, sr, channels, format="OGG", subtype="VORBIS")


def write_mp3(path: Path, seconds: float = 1.0, freq: float = 440.0, sr: int = 44100, channels: int = 1) -> Path:
    """MP3 through PyAV's bundled LAME encoder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = tone(seconds, freq, sr, channels).T.copy()  # planar [channels, samples]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libmp3lame", rate=sr, layout="mono" if channels == 1 else "stereo")
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=stream.layout.name)
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


AUDIO_WRITERS = {".wav": write_wav, ".flac": write_flac, ".ogg": write_ogg, ".mp3": write_mp3}


def write_audio(path: Path, seconds: float = 1.0, freq: float = 440.0, **kwargs) -> Path:
    """Any supported audio format, picked from the extension."""
    return AUDIO_WRITERS[Path(path).suffix.lower()](path, seconds, freq, **kwargs)


def write_image(
    path: Path, color: tuple[int, int, int] = (200, 30, 60), size: tuple[int, int] = (64, 48), noise: bool = True
) -> Path:
    """PNG/JPEG (from the extension) of `size` = (width, height): `color`, plus fixed-seed noise unless noise=False."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((size[1], size[0], 3), dtype=np.int16)
    pixels[:] = color
    if noise:
        pixels += np.random.default_rng(0).integers(-40, 41, pixels.shape, dtype=np.int16)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return path


def video_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """Frame `index` of the synthetic video: a horizontal gradient whose brightness and hue move with the index."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    phase = (index * 17) % 256
    rgb = np.concatenate([255 * x + 0 * y, 255 * y + 0 * x, np.full((h, w, 1), phase)], axis=2)
    return rgb.astype(np.uint8)


def write_video(path: Path, seconds: float = 1.0, fps: int = 8, size: tuple[int, int] = (64, 48)) -> Path:
    """MP4 (MPEG-4 part 2, yuv420p; even sizes) of `size` = (width, height) with round(seconds * fps) frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(round(seconds * fps))):
            for packet in stream.encode(av.VideoFrame.from_ndarray(video_frame(i, size), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_garbage(path: Path, nbytes: int = 256) -> Path:
    """A file with a media extension and random bytes: unreadable by every decoder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return path


def make_row(
    id: str,
    mm: Iterable[tuple[str, str]] = (),
    instruction: str = "Describe the music.",
    output: str = "A calm piano piece.",
    text: str = "",
) -> dict:
    """One dataset row; `mm` is (modality, relative path) pairs, each becoming a placeholder in `input`."""
    mm = list(mm)
    tag = {"audio": "<Audio>", "image": "<Image>", "video": "<Video>"}
    return {
        "id": id,
        "input": "".join(tag[name] for name, _ in mm) + text,
        "instruction": instruction,
        "output": output,
        "mm_names": [name for name, _ in mm],
        "mm_paths": [p for _, p in mm],
    }


def write_dataset(directory: Path, rows: Iterable[dict], name: str = "toy_test.json") -> Path:
    """Write rows as the original's JSON list file `directory/name`; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(list(rows), indent=1))
    return path


def infer_args(tiny_root: Path, dataset: Path, out: Path, *extra: str, max_new_tokens: int = 6) -> list[str]:
    """`dr infer` on the tiny checkpoint set, greedy, a feature cache beside `out` (what the CLI tests share)."""
    return [
        "infer",
        "--dataset",
        str(dataset),
        "--ckpt-root",
        str(tiny_root),
        "--out",
        str(out),
        "--greedy",
        "--max-new-tokens",
        str(max_new_tokens),
        "--cache-dir",
        str(out.parent / "cache"),
        *extra,
    ]


def sha256(path: Path) -> str:
    """A written file's digest, read straight from its bytes: what the feature cache's hashing must agree with."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
