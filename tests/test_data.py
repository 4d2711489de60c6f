"""model/data/catalog.py (catalog, row validation, dataset check) and the `dr data` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import synth
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.data.catalog import (
    CATALOG,
    DatasetError,
    Row,
    check_dataset,
    dataset_names,
    load_rows,
    media_path,
    resolve_dataset,
)

TEST_SETS = [
    "musicqa", "musiccaps", "music4way_musiccaps", "music4way_mi2t", "music4way_mv2t", "music4way_any2t",
    "musicnet", "gtzan", "mtg", "musicinstruct_long", "musicinstruct_short",
]  # fmt: skip
MC_SETS = ["muchomusic", "rulistening", "mmau_music", "mmar_music"]  # converted by `dr data convert`
TRAIN_SETS = ["alpaca", "coco", "musiccaps", "musicqa_mtt"] + [
    f"music4way_{k}" for k in ("m2t", "i2t", "v2t", "mi2t", "mv2t")
]


def test_catalog_covers_the_original_sets():
    assert dataset_names("test") == sorted(TEST_SETS + MC_SETS)
    assert dataset_names("train") == sorted(TRAIN_SETS)
    for name in TEST_SETS:
        assert CATALOG[(name, "test")][0] == f"{name}_test.json"


def test_resolve_catalog_names_and_files(tmp_path):
    spec = resolve_dataset("musiccaps", "/d")
    assert (spec.json_path, spec.media_root) == (Path("/d/musiccaps_test.json"), Path("/d/MusicCaps/eval_audios"))
    spec = resolve_dataset("musiccaps", "/d", split="train")
    assert (spec.json_path, spec.media_root) == (Path("/d/musiccaps.json"), Path("/d/musiccaps/audios"))
    assert resolve_dataset("musicqa_mtt", "/d", split="train").json_path == Path("/d/musicqa-mtt.json")
    assert resolve_dataset("alpaca", "/d", split="train").media_root == Path("/d")
    assert resolve_dataset("mtg", "/d", media_root="/m").media_root == Path("/m")
    file = synth.write_dataset(tmp_path, [])
    spec = resolve_dataset(str(file))
    assert (spec.name, spec.json_path, spec.media_root) == ("toy_test", file, tmp_path)
    with pytest.raises(DatasetError, match="nope: not a test dataset name"):
        resolve_dataset("nope")
    with pytest.raises(DatasetError, match="alpaca: not a test dataset"):
        resolve_dataset("alpaca")


def test_valid_rows(tmp_path):
    rows = [
        synth.make_row("a", [("audio", "x.wav")]),
        synth.make_row("b", [("image", "i.png"), ("audio", "x.wav")], text=" and "),
        synth.make_row("b", [("video", "v.mp4")], instruction="Another question"),
        {"input": "", "instruction": "Hi", "output": "Hello", "mm_names": [], "mm_paths": []},
        {**synth.make_row("c"), "id": 7},
    ]
    loaded, errors = load_rows(synth.write_dataset(tmp_path, rows))
    assert errors == []
    assert [r.id for r in loaded] == ["a", "b", "b", "3", "7"]
    assert loaded[1] == Row("b", "<Image><Audio> and ", "Describe the music.", "A calm piano piece.",
                            ("image", "audio"), ("i.png", "x.wav"))  # fmt: skip
    assert media_path(loaded[1], 1, tmp_path) == tmp_path / "x.wav"
    assert media_path(Row("z", "<Audio>", "", "", ("audio",), ("/abs/a.wav",)), 0, tmp_path) == Path("/abs/a.wav")


def test_invalid_rows_are_reported_with_file_and_index(tmp_path):
    good = synth.make_row("ok", [("audio", "a.wav")])
    rows = [
        good,
        {k: v for k, v in good.items() if k != "output"},
        {**good, "instruction": 3},
        {**good, "input": "<Audio><Audio>"},
        {**synth.make_row("o", [("image", "i.png"), ("audio", "a.wav")]), "mm_names": ["audio", "image"]},
        {**good, "mm_paths": []},
        {**good, "mm_names": ["smell"], "input": ""},
        {**good, "mm_paths": "a.wav"},
        "not a row",
        good,
    ]
    path = synth.write_dataset(tmp_path, rows)
    loaded, errors = load_rows(path)
    assert [r.id for r in loaded] == ["ok"]
    expected = [
        (1, "missing field(s) output"),
        (2, "instruction must be a string"),
        (3, "placeholders in input ask for ['audio', 'audio'] but mm_names is ['audio']"),
        (4, "placeholders in input ask for ['image', 'audio'] but mm_names is ['audio', 'image']"),
        (5, "mm_paths has 0 entries but mm_names has 1"),
        (6, "unknown modality 'smell'"),
        (7, "mm_paths must be a list of strings"),
        (8, "expected an object, got str"),
        (9, "with the same instruction as row 0"),
    ]
    assert len(errors) == len(expected)
    for line, (index, reason) in zip(errors, expected, strict=True):
        assert line.startswith(f"{path}:{index}: ") and reason in line and "\n" not in line


def test_unusable_files(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_rows(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_rows(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_rows(tmp_path / "obj.json")


@pytest.mark.parametrize("tag,modality", [("<Audio>", "audio"), ("<Image>", "image"), ("<Video>", "video")])
def test_each_placeholder_asks_for_its_own_modality(tmp_path, tag, modality):
    """The original's three tags: a row whose input holds one loads when mm_names lists that tag's modality and is
    refused when it lists either other one."""
    row = {"input": f"Listen: {tag}", "instruction": "q", "output": "a", "mm_paths": ["f"]}
    others = [m for m in ("audio", "image", "video") if m != modality]
    rows = [{**row, "id": m, "instruction": m, "mm_names": [m]} for m in [modality, *others]]
    loaded, errors = load_rows(synth.write_dataset(tmp_path, rows))
    assert [(r.id, r.mm_names) for r in loaded] == [(modality, (modality,))]
    assert len(errors) == 2 and all(f"ask for ['{modality}']" in line for line in errors)


@pytest.fixture
def toy(tmp_path) -> Path:
    """A toy dataset: one good row per modality, a missing file, a corrupt file and an invalid row."""
    m = tmp_path / "media"
    synth.write_wav(m / "a.wav", 1.0)
    synth.write_image(m / "i.png")
    synth.write_video(m / "v.mp4", 1.0)
    synth.write_garbage(m / "bad.mp3")
    rows = [
        synth.make_row("1", [("audio", "a.wav")]),
        synth.make_row("2", [("image", "i.png"), ("audio", "a.wav")]),
        synth.make_row("3", [("video", "v.mp4")]),
        synth.make_row("4", [("audio", "bad.mp3")]),
        synth.make_row("5", [("audio", "gone.wav")]),
        {**synth.make_row("6"), "input": "<Video>"},
    ]
    return synth.write_dataset(tmp_path, rows)


@pytest.mark.parametrize("decode", [False, True])
def test_check_dataset_counts(toy, decode):
    report = check_dataset(resolve_dataset(str(toy), media_root=toy.parent / "media"), decode=decode)
    assert report.rows == 6 and len(report.row_errors) == 1 and not report.ok
    assert dict(report.media["audio"]) == {"present": 1, "missing": 1, "unreadable": 1}
    assert dict(report.media["image"]) == {"present": 1}
    assert dict(report.media["video"]) == {"present": 1}
    assert sorted(e.split(": ")[0].rsplit("/", 1)[1] for e in report.media_errors) == ["bad.mp3", "gone.wav"]


def test_cli_check(toy, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", "--dataset", str(toy), "--media-root", str(toy.parent / "media")])
    assert result.exit_code == 1
    assert "audio files" in result.output and "gone.wav: no such file" in result.output
    clean = synth.write_dataset(toy.parent, [synth.make_row("1", [("audio", "a.wav")])], name="clean.json")
    result = runner.invoke(app, ["data", "check", "--dataset", str(clean), "--media-root", str(toy.parent / "media")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "check", "--dataset", "gtzan", "--data-root", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "gtzan_test.json: no such file" in result.output


def test_cli_download_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(app, ["data", "download", "--data-root", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "could not fetch data/" in result.output and "by hand" in result.output
