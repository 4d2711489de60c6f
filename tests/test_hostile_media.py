"""Issue 27 #1, #3, #7: hostile media files, made for real (a few KB each). Non-finite samples or features are one
row's one-line MediaError and never cached; files that claim gigabytes are refused from their header, or read clip by
clip, in bounded memory and time; devices and FIFOs are refused before anything reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import synth
import torch
from PIL import Image

from model.media import audio as audio_module
from model.media import bounds
from model.media.encoder import MediaEncoder, NonFiniteFeatures
from model.media.encoding import encode_files
from model.media.features import FeatureCache
from model.media.preprocess import MediaError, load_audio, load_media, probe_media

REPO = Path(__file__).resolve().parents[1]
PEAK_BUDGET_MB = 300  # the most a bomb may add to the process's peak resident memory
SECONDS_BUDGET = 10  # per file, on 2 busy CPU cores


def float_wav(path: Path, value: float, rate: int = 16000, n: int = 48000) -> Path:
    sf.write(path, np.full(n, value, "float32"), rate, subtype="FLOAT")
    return path


def one_line(err: MediaError, path: Path) -> str:
    text = str(err)
    assert text.startswith(f"{path}: ") and "\n" not in text
    return text


# ------------------------------------------------------------------------------------------------ non-finite media
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e38])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_non_finite_or_overflowing_audio_is_a_media_error(tmp_path, value, rate):
    path = float_wav(tmp_path / "x.wav", value, rate)
    with pytest.raises(MediaError, match="not finite") as info:
        load_media("audio", path)
    one_line(info.value, path)


@pytest.mark.parametrize("value", [np.nan, 1e38])
def test_non_finite_audio_read_clip_by_clip_is_a_media_error(tmp_path, monkeypatch, value):
    path = float_wav(tmp_path / "x.wav", value, 16000, 16000 * 12)
    monkeypatch.setattr(audio_module, "FULL_DECODE_SAMPLES", 1000)
    with pytest.raises(MediaError, match="not finite"):
        load_audio(path)


class CountingEncoder:
    """The encoder interface (see tests/test_features.py): a mean per clip, all NaN for an item whose mean is above
    `poison`."""

    fingerprint = "fake-nan"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, poison: float = float("inf")) -> None:
        self.poison = poison

    def state_dict(self) -> dict:
        return {}

    def weights_file(self) -> None:
        return None

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        means = inputs.flatten(2).mean(-1, keepdim=True)
        poisoned = inputs.flatten(1).mean(1) > self.poison
        return torch.where(poisoned[:, None, None], torch.nan, means)


def test_a_nan_file_fails_alone_and_is_never_cached(tmp_path):
    good = synth.write_wav(tmp_path / "good.wav", 3.0)
    bad = float_wav(tmp_path / "bad.wav", np.nan)
    cache = FeatureCache(tmp_path / "cache", CountingEncoder.fingerprint)
    out = encode_files(CountingEncoder(), cache, "audio", [bad, good, bad], batch_size=4)
    assert isinstance(out[1], torch.Tensor) and torch.isfinite(out[1]).all()
    one_line(out[0], bad)
    assert isinstance(out[2], MediaError) and "not finite" in str(out[2])
    assert cache.get("audio", bad) is None and cache.get("audio", good) is not None


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("poisoned_first", [False, True])
def test_non_finite_encoder_features_fail_their_file_and_are_never_cached(tmp_path, batch_size, poisoned_first):
    """In a batch of its own or beside a good file, first or last (encoder calls are read back one behind)."""
    tone = synth.write_wav(tmp_path / "tone.wav", 3.0)
    dc = tmp_path / "dc.wav"
    sf.write(dc, np.full(48000, 0.9, "float32"), 16000, subtype="FLOAT")
    (low_mean, fine), (high_mean, poisoned) = sorted((float(load_audio(p).mean()), p) for p in (tone, dc))
    assert low_mean < high_mean
    cache = FeatureCache(tmp_path / "cache", CountingEncoder.fingerprint)
    files = [poisoned, fine] if poisoned_first else [fine, poisoned]
    encoded = encode_files(CountingEncoder((low_mean + high_mean) / 2), cache, "audio", files, batch_size)
    out = dict(zip(files, encoded, strict=True))
    assert isinstance(out[fine], torch.Tensor) and torch.isfinite(out[fine]).all()
    assert "encoder features are not finite" in one_line(out[poisoned], poisoned)
    assert cache.get("audio", poisoned) is None and cache.get("audio", fine) is not None
    with pytest.raises(ValueError, match="not finite"):
        cache.put("audio", poisoned, torch.full((3, 1), torch.nan))


def test_a_cached_nan_entry_is_a_miss(tmp_path):
    path = synth.write_wav(tmp_path / "a.wav", 3.0)
    cache = FeatureCache(tmp_path / "cache", CountingEncoder.fingerprint)
    encode_files(CountingEncoder(), cache, "audio", [path])
    from safetensors.torch import save_file

    save_file({"features": torch.full((3, 1), torch.nan)}, cache.entry("audio", path))  # as an older version might
    assert cache.get("audio", path) is None and not cache.entry("audio", path).exists()


def test_the_encoder_refuses_non_finite_outputs_naming_the_items():
    encoder = MediaEncoder("tiny")
    inputs = torch.randn(2, 3, 1, 128, 204)
    assert torch.isfinite(encoder("audio", inputs)).all()
    with torch.no_grad():
        encoder.imagebind.modality_heads["audio"][-1].weight[0, 0] = torch.inf
    with pytest.raises(NonFiniteFeatures, match="audio item\\(s\\) 1, 2 of the batch") as info:
        encoder("audio", inputs)
    assert info.value.items == [0, 1] and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- devices, FIFOs, directories
def run_isolated(code: str, timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter (this worktree's modules); it sets `result`, printed back as JSON."""
    script = "import json\n" + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_devices_and_fifos_are_refused_before_any_read(tmp_path):
    (tmp_path / "zero.wav").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.wav")
    os.mkfifo(tmp_path / "raw_fifo")
    (tmp_path / "dir.wav").mkdir()
    result = run_isolated(
        f"""
        from pathlib import Path
        import torch
        from model.media.encoding import encode_files
        from model.media.features import FeatureCache
        from model.media.preprocess import MediaError, load_media, probe_media
        tmp = Path({str(tmp_path)!r})
        paths = ["/dev/zero", tmp / "zero.wav", tmp / "fifo.wav", tmp / "dir.wav"]
        cache = FeatureCache(tmp / "cache", "fake")
        class Encoder:  # never called: every file fails first
            fingerprint, dtype, device = "fake", torch.float32, torch.device("cpu")
        result = {{"encode": [str(e) for e in encode_files(Encoder(), cache, "audio", paths)]}}
        errors = []
        for p in paths:
            for call in (load_media, probe_media):
                try:
                    call("audio", p)
                except MediaError as e:
                    errors.append(str(e))
        result["load"] = errors
        try:
            cache.file_hash(tmp / "raw_fifo")  # even without the type check first: never blocks
        except MediaError as e:
            result["hash"] = str(e)
        """,
        timeout=60,
    )
    assert [e.split(": ", 1)[1] for e in result["encode"]] == [
        "unsupported audio extension '(none)' (expected .flac, .mp3, .ogg, .wav)",
        "not a regular file",
        "not a regular file",
        "not a regular file",
    ]
    assert len(result["load"]) == 8 and all("\n" not in e for e in result["load"])
    assert result["hash"] == f"{tmp_path / 'raw_fifo'}: not a regular file"


# ------------------------------------------------------------------------------------------------------ the bombs
def write_video(path: Path, size: tuple[int, int], codec: str = "libx264", frames: int = 2) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(8))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        black = np.zeros((size[1], size[0], 3), np.uint8)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(black, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_silence(path: Path, rate: int, channels: int, seconds: int) -> Path:
    """Seconds of silence, written a minute at a time (FLAC: a few hundred KB per hour)."""
    if path.suffix == ".mp3":
        layout = "mono" if channels == 1 else "stereo"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libmp3lame", rate=rate, layout=layout)
            for _ in range(seconds):
                frame = av.AudioFrame.from_ndarray(np.zeros((channels, rate), np.float32), format="fltp", layout=layout)
                frame.sample_rate = rate
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return path
    with sf.SoundFile(str(path), "w", rate, channels, subtype="PCM_16") as f:
        minute = np.zeros((rate * 60, channels), np.int16)
        for _ in range(seconds // 60):
            f.write(minute)
    return path


def measure(files: list[tuple[str, Path]], warm_up: Path, probe: bool = False) -> dict:
    """Each file through load_media (or probe_media) in one fresh process: its outcome, seconds, and the growth of
    the process's peak resident memory over the peak after loading one normal file of each modality (ru_maxrss never
    goes down, so the largest growth is that of the worst file)."""
    return run_isolated(
        f"""
        import resource, time
        from pathlib import Path
        from model.media.preprocess import MediaError, load_media, probe_media
        call = probe_media if {probe} else load_media
        warm = Path({str(warm_up)!r})
        for modality, name in [("audio", "w.wav"), ("audio", "w.mp3"), ("image", "w.png"), ("video", "w.mp4")]:
            load_media(modality, warm / name)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = {{}}
        for modality, path in {[(m, str(p)) for m, p in files]!r}:
            start = time.perf_counter()
            try:
                out = call(modality, path)
                outcome = "ok" if out is None else list(out.shape)
            except MediaError as e:
                outcome = "MediaError: " + str(e)
            except Exception as e:
                outcome = "other " + type(e).__name__ + ": " + str(e)
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
            result[path] = {{"outcome": outcome, "seconds": time.perf_counter() - start, "peak_mb": peak}}
        """,
        timeout=300,
    )


@pytest.fixture(scope="module")
def warm_up(tmp_path_factory) -> Path:
    """One small normal file of each modality, loaded before measuring (lazy initialisations are not a bomb's)."""
    d = tmp_path_factory.mktemp("warm")
    synth.write_wav(d / "w.wav", 3.0, sr=44100)
    synth.write_mp3(d / "w.mp3", 3.0)
    synth.write_image(d / "w.png")
    synth.write_video(d / "w.mp4", 3.0)
    return d


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, tuple[str, Path, str]]:
    """name -> (modality, file, what load_media must say: an error's words, or "ok")."""
    d = tmp_path_factory.mktemp("bombs")
    sf.write(d / "rate.wav", np.zeros(100, np.int16), 655349, subtype="PCM_16")  # 244 bytes claiming 655 kHz
    sf.write(d / "low.wav", np.zeros(100, np.int16), 500, subtype="PCM_16")
    sf.write(d / "channels.wav", np.zeros((10, 64), np.int16), 16000, subtype="PCM_16")
    sf.write(d / "odd_rate.wav", (synth.tone(1.0, sr=16001) * 32767).astype(np.int16), 16001, subtype="PCM_16")
    Image.new("1", (13000, 13000)).save(d / "huge.png")  # 20 KB
    Image.new("L", (1, 10000)).save(d / "tall.png")  # 99 bytes
    Image.new("L", (60000, 1)).save(d / "wide.png")
    out = {
        "655 kHz wav": ("audio", d / "rate.wav", "sample rate 655349 Hz is outside 1000..192000 Hz"),
        "500 Hz wav": ("audio", d / "low.wav", "sample rate 500 Hz is outside"),
        "64 channels": ("audio", d / "channels.wav", "64 audio channels (at most 8)"),
        "16001 Hz wav": ("audio", d / "odd_rate.wav", "ok"),
        "2 h flac": ("audio", write_silence(d / "hours.flac", 8000, 1, 7200), "7200 s long (at most 3600 s)"),
        "20 min flac": ("audio", write_silence(d / "long.flac", 48000, 2, 1200), "ok"),
        "13000x13000 png": ("image", d / "huge.png", "13000x13000 pixels is over 36,000,000"),
        "1x10000 png": ("image", d / "tall.png", "1x10000 pixels is more elongated than 10:1"),
        "60000x1 png": ("image", d / "wide.png", "60000x1 pixels is more elongated than 10:1"),
        "4096x4096 h264": ("video", write_video(d / "huge.mp4", (4096, 4096)), "4096x4096 pixels is over 8,294,400"),
        "16x4000 h264": ("video", write_video(d / "thin.mp4", (16, 4000)), "16x4000 pixels is more elongated"),
        "2x4000 mkv": ("video", write_video(d / "thin.mkv", (2, 4000)), "2x4000 pixels is more elongated"),
    }
    assert (d / "rate.wav").stat().st_size == 244 and (d / "tall.png").stat().st_size < 200
    return out


def check(bombs: dict, results: dict) -> None:
    for name, (_, path, expected) in bombs.items():
        got = results[str(path)]
        if expected == "ok":
            assert isinstance(got["outcome"], list) or got["outcome"] == "ok", (name, got)
        else:
            assert got["outcome"].startswith(f"MediaError: {path}: ") and expected in got["outcome"], (name, got)
        assert got["seconds"] < SECONDS_BUDGET, (name, got)
        assert got["peak_mb"] < PEAK_BUDGET_MB, (name, got)


def test_bombs_are_refused_or_read_in_bounded_memory_and_time(bombs, warm_up):
    check(bombs, measure([(m, p) for m, p, _ in bombs.values()], warm_up))


def test_probe_refuses_the_same_bombs_from_their_headers(bombs, warm_up):
    check(bombs, measure([(m, p) for m, p, _ in bombs.values()], warm_up, probe=True))


@pytest.mark.slow
def test_hours_of_mp3_are_refused_and_long_mp3_read_clip_by_clip(tmp_path, warm_up):
    files = {
        "over an hour": ("audio", write_silence(tmp_path / "hours.mp3", 8000, 1, 3700), "3700 s long"),
        "40 min": ("audio", write_silence(tmp_path / "long.mp3", 8000, 1, 2400), "ok"),
    }
    check(files, measure([(m, p) for m, p, _ in files.values()], warm_up))


# ------------------------------------------------------------------------------------ the bounds keep normal files
def test_an_odd_rate_is_resampled_at_a_near_ratio_and_common_rates_exactly():
    for rate in (8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000, 192000):
        assert Fraction(*bounds.resample_ratio(rate, 16000)) == Fraction(rate, 16000), rate
    assert bounds.resample_ratio(16001, 16000) == (1, 1)
    orig, new = bounds.resample_ratio(47952, 16000)
    assert new <= bounds.RESAMPLE_DENOMINATOR and abs(orig / new / (47952 / 16000) - 1) < 1e-3


def test_a_16001_hz_file_reads_as_its_samples_at_16_khz(tmp_path):
    samples = (synth.tone(3.0, sr=16001) * 32767).astype(np.int16)
    sf.write(tmp_path / "odd.wav", samples, 16001, subtype="PCM_16")
    sf.write(tmp_path / "even.wav", samples, 16000, subtype="PCM_16")
    assert torch.equal(load_audio(tmp_path / "odd.wav"), load_audio(tmp_path / "even.wav"))


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".mp3"])
@pytest.mark.parametrize("rate, channels", [(44100, 2), (48000, 1), (22050, 1), (16000, 2), (8000, 1), (32000, 1)])
def test_reading_clip_by_clip_equals_decoding_whole(tmp_path, monkeypatch, ext, rate, channels):
    path = synth.write_audio(tmp_path / f"a{ext}", 12.3, 440.0, sr=rate, channels=channels)
    whole = load_audio(path)
    monkeypatch.setattr(audio_module, "FULL_DECODE_SAMPLES", 1000)
    assert torch.equal(load_audio(path), whole)


def test_long_audio_is_read_clip_by_clip_with_the_same_result(tmp_path, monkeypatch):
    """A file well past the resampler's context on every side (so not the whole file in each read)."""
    path = synth.write_wav(tmp_path / "long.wav", 95.0, 440.0, sr=44100, channels=2)
    whole = load_audio(path)
    reads = []
    real = audio_module._read_soundfile

    def counting(p):
        read = real(p)
        return lambda ranges: reads.extend(ranges) or read(ranges)

    monkeypatch.setattr(audio_module, "FULL_DECODE_SAMPLES", 1000)
    monkeypatch.setattr(audio_module, "_read_soundfile", counting)
    assert torch.equal(load_audio(path), whole)
    assert len(reads) == 3 and sum(b - a for a, b in reads) < 3 * 11 * 44100


def test_normal_files_pass_the_probe(tmp_path):
    probe_media("audio", synth.write_flac(tmp_path / "a.flac", 2.0))
    probe_media("image", synth.write_image(tmp_path / "i.png", size=(640, 64)))  # 10:1 is allowed
    probe_media("video", synth.write_video(tmp_path / "v.mp4"))


def test_a_batch_keeps_its_finite_items_when_the_encoder_refuses_one(tmp_path, monkeypatch):
    """The real (tiny) encoder: finite but huge inputs overflow inside it; that file fails, its batch-mate does not."""
    from model.media import decoders

    good, bad = synth.write_wav(tmp_path / "good.wav", 3.0), synth.write_wav(tmp_path / "bad.wav", 3.0, 300.0)
    real = decoders.load_media
    huge = torch.full((3, 1, 128, 204), 1e30)
    monkeypatch.setattr(decoders, "load_media", lambda m, p: huge if Path(p) == bad else real(m, p))
    encoder = MediaEncoder("tiny")
    cache = FeatureCache(tmp_path / "cache", encoder.fingerprint)
    out = encode_files(encoder, cache, "audio", [good, bad], batch_size=2)
    alone = encoder("audio", real("audio", good)[None])[0]
    assert isinstance(out[0], torch.Tensor) and torch.allclose(out[0], alone, atol=1e-5)
    assert "encoder features are not finite" in one_line(out[1], bad)
    assert cache.get("audio", bad) is None and cache.get("audio", good) is not None
