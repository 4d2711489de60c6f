"""The demo dataset: deterministic from its seed, valid rows, media that match their text, disjoint splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from demo import data as demo_data
from model.data.catalog import check_dataset, load_rows, resolve_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> demo_data.DemoData:
    return demo_data.build(tmp_path_factory.mktemp("demo_data"), seed=3, quick=True)


def all_rows(data: demo_data.DemoData, files: list[Path] | None = None) -> list[dict]:
    return [r for f in files or [*data.stage1, *data.stage2, data.test] for r in json.loads(f.read_text())]


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_files_other_seed_other_media(data, tmp_path):
    again = demo_data.build(tmp_path / "again", seed=3, quick=True)
    assert digests(again.root) == digests(data.root)
    other = digests(demo_data.build(tmp_path / "other", seed=4, quick=True).root)
    assert other.keys() == digests(data.root).keys()
    assert other["audios/train_0000.wav"] != digests(data.root)["audios/train_0000.wav"]


def test_rows_are_valid_and_media_readable(data):
    for path in [*data.stage1, *data.stage2, data.test]:
        rows, errors = load_rows(path)
        assert rows and not errors
        report = check_dataset(resolve_dataset(path))
        assert report.ok, report.media_errors[:3]
    tasks = {r["id"].split("-")[0] for r in all_rows(data, [data.test])}
    assert tasks == set(demo_data.STAGE2_TASKS)
    assert {tuple(r["mm_names"]) for r in all_rows(data)} == {
        ("audio",),
        ("image",),
        ("video",),
        ("audio", "image"),
        ("audio", "video"),
    }


def spectrum_centroid(path: Path) -> float:
    audio, sr = sf.read(path)
    power = np.abs(np.fft.rfft(audio)) ** 2
    return float((np.fft.rfftfreq(len(audio), 1 / sr) * power).sum() / power.sum())


def test_audio_matches_its_caption(data):
    by_clip = {r["mm_paths"][0]: r["output"] for r in all_rows(data, [data.stage1[0]])}  # m2t captions
    peaks = {"soft": [], "loud": []}
    centroid = {name: [] for name in demo_data.INSTRUMENTS}
    for clip, caption in by_clip.items():
        audio, _ = sf.read(data.root / clip)
        (loudness,) = demo_data.mentioned(caption, "loudness")
        (instrument,) = demo_data.mentioned(caption, "instrument")
        peaks[loudness].append(np.abs(audio).max())
        centroid[instrument].append(spectrum_centroid(data.root / clip))
    assert max(peaks["soft"]) < 0.2 < 0.5 < min(peaks["loud"])
    medians = [np.median(centroid[name]) for name in ("bass", "piano", "flute")]
    assert medians == sorted(medians)


def test_images_match_their_caption(data):
    channel = {"red": 0, "green": 1, "blue": 2}
    for r in all_rows(data, [data.stage1[1]]):  # i2t captions
        pixels = np.asarray(Image.open(data.root / r["mm_paths"][0])).reshape(-1, 3).astype(int)
        coloured = pixels[pixels.max(1) - pixels.min(1) > 100]  # the pattern, not the grey background
        (color,) = demo_data.mentioned(r["output"], "color")
        assert np.bincount(coloured.argmax(1), minlength=3).argmax() == channel[color]


def test_splits_are_disjoint(data):
    train, test = all_rows(data, [*data.stage1, *data.stage2]), all_rows(data, [data.test])
    media = {split: {p for r in rows for p in r["mm_paths"]} for split, rows in (("train", train), ("test", test))}
    assert media["train"].isdisjoint(media["test"])
    files = digests(data.root)
    assert {files[p] for p in media["train"]}.isdisjoint(files[p] for p in media["test"])
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)


def test_every_attribute_combination_is_held_out(data):
    captions = [r["output"] for r in all_rows(data, [data.test]) if r["id"].startswith("mv2t")]
    combos = {
        tuple(sorted(demo_data.mentioned(c, a).pop() for a in ("instrument", "tempo", "loudness"))) for c in captions
    }
    assert len(combos) == len(demo_data.INSTRUMENTS) * len(demo_data.TEMPOS) * len(demo_data.LOUDNESS)


def test_attribute_accuracy():
    refs = ["A loud bass piece at a slow tempo.", "The image shows red dots.", "Nothing to check here."]
    cands = ["A loud flute piece at a slow tempo.", "The image shows red and blue dots.", "whatever"]
    acc = demo_data.attribute_accuracy(cands, refs)
    assert acc["loudness"] == acc["tempo"] == acc["shape"] == 1.0
    assert acc["instrument"] == acc["color"] == 0.0  # wrong value; two colours named
    assert acc["all"] == 3 / 5
    assert demo_data.attribute_accuracy([], [])["all"] is None
