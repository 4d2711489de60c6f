"""model/media/preprocess.py against ImageBind's own data.py (loaded with stub modules) and independent computations."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import synth
import torch
import torchaudio

from model.media import preprocess as media
from model.media.preprocess import MediaError, load_audio, load_image, load_media, load_video


class ConstantClipsSampler:
    """Test double of pytorchvideo's stateful ConstantClipsPerVideoSampler, written from its documented rule."""

    def __init__(self, clip_duration: float, clips_per_video: int) -> None:
        self.clip_duration, self.clips, self.index = Fraction(clip_duration), clips_per_video, 0

    def __call__(self, last_clip_time, video_duration, annotation):
        max_start = Fraction(max(video_duration - self.clip_duration, 0))
        step = Fraction(max_start, self.clips)
        start, self.index = step * self.index, self.index + 1
        last = self.index >= self.clips or step * self.index > max_start
        if last:
            self.index = 0
        return start, start + self.clip_duration, self.index, 0, last


@pytest.fixture(scope="module")
def reference() -> types.ModuleType:
    """The installed imagebind/data.py, imported with stubs for pytorchvideo, pkg_resources and the tokenizer."""
    path = Path(importlib.util.find_spec("imagebind").submodule_search_locations[0]) / "data.py"
    stubs = {name: types.ModuleType(name) for name in [
        "pkg_resources", "pytorchvideo", "pytorchvideo.transforms", "pytorchvideo.data",
        "pytorchvideo.data.clip_sampling", "pytorchvideo.data.encoded_video",
        "imagebind", "imagebind.models", "imagebind.models.multimodal_preprocessors",
    ]}  # fmt: skip
    stubs["pytorchvideo"].transforms = stubs["pytorchvideo.transforms"]
    stubs["pytorchvideo.data.clip_sampling"].ConstantClipsPerVideoSampler = ConstantClipsSampler
    stubs["pytorchvideo.data.encoded_video"].EncodedVideo = None
    stubs["imagebind.models.multimodal_preprocessors"].SimpleTokenizer = None
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location("_imagebind_data_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def soundfile_load(path: str) -> tuple[torch.Tensor, int]:
    """torchaudio.load stand-in for the reference (torchaudio 2.x needs torchcodec + system FFmpeg)."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


@pytest.mark.parametrize(
    "seconds, sr, channels",
    [(1.0, 16000, 1), (3.0, 16000, 1), (9.0, 16000, 1), (2.5, 44100, 2), (7.0, 22050, 1)],
)
def test_audio_matches_imagebind_exactly(tmp_path, reference, monkeypatch, seconds, sr, channels):
    path = synth.write_wav(tmp_path / "a.wav", seconds, 440.0, sr=sr, channels=channels)
    monkeypatch.setattr(torchaudio, "load", soundfile_load)
    expected = reference.load_and_transform_audio_data([str(path)], "cpu")[0]
    got = load_audio(path)
    assert got.shape == (3, 1, 128, 204) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_clip_timepoints_follow_the_sampler():
    for duration, clips in [(0.5, 3), (2.0, 3), (3.7, 3), (10.0, 3), (12.34, 5)]:
        sampler, expected, last = ConstantClipsSampler(2, clips), [], False
        while not last:
            start, end, _, _, last = sampler(0.0, duration, None)
            expected.append((start, end))
        assert media.clip_timepoints(duration, 2, clips) == expected


def test_overlapping_clips_subtract_means_in_place_like_the_original():
    wave = torch.from_numpy(synth.tone(3.0, 440.0).T.copy())
    shifted = wave.clone().double().numpy()
    for start, end in media.clip_timepoints(3.0, 2, 3):  # what the original does: views, shifted in turn
        a, b = int(start * 16000), int(end * 16000)
        shifted[:, a:b] -= shifted[:, a:b].mean()
    media.audio_clips(wave, 16000)
    np.testing.assert_allclose(wave.numpy(), shifted, atol=1e-6)
    assert not np.allclose(shifted[:, :8000], synth.tone(3.0, 440.0).T[:, :8000] - 0.1, atol=1e-4)


def test_stereo_uses_first_channel_like_kaldi_fbank(tmp_path):
    """No mono mix: the original's fbank reads channel 0 (only the shared mean subtraction links the channels)."""
    stereo = load_audio(synth.write_wav(tmp_path / "s.wav", 2.0, 440.0, channels=2))
    left = load_audio(synth.write_wav(tmp_path / "l.wav", 2.0, 440.0, channels=1))
    assert torch.allclose(stereo, left, atol=1e-2)
    mix = torch.from_numpy(synth.tone(2.0, 440.0, channels=2).mean(axis=1, keepdims=True).T.copy())
    assert not torch.allclose(stereo, media.audio_clips(mix, 16000), atol=0.1)


def test_audio_formats(tmp_path):
    wav = load_audio(synth.write_wav(tmp_path / "a.wav", 2.0, 440.0))
    assert torch.equal(load_audio(synth.write_flac(tmp_path / "a.flac", 2.0, 440.0)), wav)  # lossless, same decode
    for path in [synth.write_ogg(tmp_path / "a.ogg", 2.0), synth.write_mp3(tmp_path / "a.mp3", 2.0)]:
        x = load_media("audio", path)
        assert x.shape == (3, 1, 128, 204) and torch.isfinite(x).all()
        assert (x - wav).abs().mean() < 0.5  # same tone, lossy codec


def test_mp3_decodes_to_the_written_samples(tmp_path):
    path = synth.write_mp3(tmp_path / "a.mp3", 1.0, 440.0, sr=44100)
    wave, sr = media.decode_audio(path)
    assert sr == 44100 and wave.shape[0] == 1 and abs(wave.shape[1] - 44100) < 1200
    assert abs(float(wave.mean()) - 0.1) < 0.01 and 0.4 < float(wave.max()) < 0.7


@pytest.mark.parametrize(
    "name, size",
    [
        ("i.png", (64, 48)),
        ("i.jpg", (40, 90)),
        ("i.bmp", (224, 224)),
        ("i.png", (500, 333)),  # downscaled, the long side truncated (336.3)
        ("i.png", (333, 501)),  # portrait
        ("i.png", (225, 224)),  # no resize, a crop offset of 0.5 (rounded to even: 0)
        ("i.png", (224, 227)),  # a crop offset of 1.5 (rounded to even: 2)
        ("i.png", (227, 1000)),  # an odd offset after the resize
    ],
)
def test_image_matches_imagebind_exactly(tmp_path, reference, name, size):
    """load_image (PIL and torch, no torchvision) against ImageBind's own torchvision-based transform."""
    path = synth.write_image(tmp_path / name, size=size)
    got = load_image(path)
    assert got.shape == (3, 224, 224)
    assert torch.equal(got, reference.load_and_transform_vision_data([str(path)], "cpu")[0])


def test_decoding_every_kind_imports_no_torchvision(tmp_path):
    """A decoding process pays for its imports at its first file of a kind, on every core of a job's pool at once:
    torchvision is not one of them (1.4 s a process: it pulls in torch._dynamo)."""
    files = {
        "image": synth.write_image(tmp_path / "i.png"),
        "video": synth.write_video(tmp_path / "v.mp4", 1.0),
        "audio": synth.write_wav(tmp_path / "a.wav"),
    }
    loads = "".join(f"load_media({kind!r}, {str(path)!r})\n" for kind, path in files.items())
    code = f"""import sys
from model.media.preprocess import load_media
{loads}print(",".join(m for m in ("torchvision", "torch._dynamo") if m in sys.modules))"""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1:] in ([], [""])


def test_uniform_image_values(tmp_path):
    got = load_image(synth.write_image(tmp_path / "u.png", color=(10, 128, 250), noise=False))
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(media.CLIP_MEAN)) / torch.tensor(media.CLIP_STD)
    assert torch.allclose(got, expected[:, None, None].expand(3, 224, 224), atol=1e-5)


def reference_video(path: Path, reference: types.ModuleType) -> torch.Tensor:
    """ImageBind's video pipeline rebuilt independently: all frames decoded, decord's get_clip indexing,
    pytorchvideo's temporal subsample and short-side scale, then data.py's own NormalizeVideo and SpatialCrop."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]))
    sampler, clips, last = ConstantClipsSampler(2, 5), [], False
    while not last:
        start, end, _, _, last = sampler(0.0, len(frames) / fps, None)
        idx = list(range(math.ceil(fps * start), min(math.ceil(fps * end), len(frames))))
        clip = frames[idx].float().permute(3, 0, 1, 2)  # C, T, H, W
        clip = clip[:, torch.linspace(0, clip.shape[1] - 1, 2).long()] / 255.0
        h, w = clip.shape[2:]
        size = (224, int(w / h * 224)) if w >= h else (int(h / w * 224), 224)
        clip = torch.nn.functional.interpolate(clip, size=size, mode="bilinear", align_corners=False)
        clips.append(reference.NormalizeVideo(mean=media.CLIP_MEAN, std=media.CLIP_STD)(clip))
    return torch.stack(reference.SpatialCrop(224, num_crops=3)(clips))


@pytest.mark.parametrize(
    "seconds, fps, size",
    [
        (3.0, 8, (64, 48)),
        (1.0, 6, (48, 80)),
        (10.0, 8, (224, 224)),  # `dr bench job`'s videos: already 224 on the short side, so not rescaled
        (2.0, 25, (640, 360)),  # large enough that swscale slices the reference's RGB conversion across threads
        (2.5, 10, (360, 640)),
    ],
)
def test_video_matches_imagebind(tmp_path, reference, seconds, fps, size):
    path = synth.write_video(tmp_path / "v.mp4", seconds, fps, size)
    got = load_video(path)
    assert got.shape == (15, 3, 2, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, reference_video(path, reference))


@pytest.mark.parametrize(
    "modality, name, reason",
    [
        ("audio", "missing.wav", "no such file"),
        ("audio", "a.txt", "unsupported audio extension"),
        ("image", "missing.png", "no such file"),
        ("video", "v.gif", "unsupported video extension"),
    ],
)
def test_missing_and_unsupported(tmp_path, modality, name, reason):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "v.gif").write_text("x")
    with pytest.raises(MediaError, match=reason) as info:
        load_media(modality, tmp_path / name)
    assert str(info.value).startswith(f"{tmp_path / name}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("modality, name", [("audio", "x.wav"), ("audio", "x.mp3"), ("audio", "x.ogg"),
                                            ("image", "x.png"), ("video", "x.mp4")])  # fmt: skip
def test_corrupt_files(tmp_path, modality, name):
    path = synth.write_garbage(tmp_path / name)
    with pytest.raises(MediaError, match="unreadable") as info:
        load_media(modality, path)
    assert "\n" not in str(info.value)
    with pytest.raises(MediaError, match="unreadable"):
        media.probe_media(modality, path)


def test_empty_and_too_short_audio(tmp_path):
    with pytest.raises(MediaError, match="empty audio"):
        load_audio(synth.write_wav(tmp_path / "e.wav", 0.0))
    with pytest.raises(MediaError, match="too short"):
        load_audio(synth.write_wav(tmp_path / "s.wav", 0.01))


def test_probe_accepts_good_files(tmp_path):
    media.probe_media("audio", synth.write_wav(tmp_path / "a.wav"))
    media.probe_media("audio", synth.write_mp3(tmp_path / "a.mp3"))
    media.probe_media("image", synth.write_image(tmp_path / "i.jpg"))
    media.probe_media("video", synth.write_video(tmp_path / "v.mp4"))
    audio_only = synth.write_mp3(tmp_path / "b.mp3").rename(tmp_path / "audio_only.mp4")
    with pytest.raises(MediaError, match="no video stream"):
        media.probe_media("video", audio_only)


def test_unknown_modality():
    with pytest.raises(ValueError, match="unknown modality"):
        load_media("text", "x")
