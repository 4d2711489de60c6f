"""model/data/benchmarks.py and multiple_choice.py: each benchmark's published format -> dr rows -> back, prompts as
the benchmarks write them.

Each file below is synthesized in the format its benchmark publishes (field names as in the public repositories). A
round trip recovers every question's text, correct answer, distractors, audio file and categories from the converted
rows, so a converter that drops, reorders or mislabels any of them fails.
"""

from __future__ import annotations

import csv
import json

import pytest
import synth
from typer.testing import CliRunner

from deepresonance_cli.app import app
from model.data.benchmarks import BenchmarkFormatError, convert
from model.data.catalog import load_rows, resolve_dataset
from model.data.multiple_choice import classification_rows, has_choices, load_choice_rows

MUCHO_CSV = [
    {
        "id": "0",
        "question": "What rhythm pattern do the digital drums follow?",
        "correct_answer": "Four on the floor.",
        "distractor_1_answer": "Off-beat syncopation.",
        "distractor_2_answer": "Scat singing.",
        "distractor_3_answer": "E-guitar playing a simple melody.",
        "dataset": "sdd",
        "dataset_identifier": "415600.json",
        "genre": "Reggae",
        "music_reasoning": "['genre and style']",
        "music_knowledge": "",
    },
    {
        "id": "1",
        "question": "Which instrument leads?",
        "correct_answer": "Piano",
        "distractor_1_answer": "Organ",
        "distractor_2_answer": "Drums",
        "distractor_3_answer": "Violin",
        "dataset": "musiccaps",
        "dataset_identifier": "-0Gj8-vB1q4_3.json",
        "genre": "",
        "music_reasoning": "[]",
        "music_knowledge": "['melody', 'instrumentation']",
    },
]
RUL = {
    "1740": {
        "question": "What is the role of the piano in this piece?",
        "caption": "An acoustic indie rock piece.",
        "correct_answer": "Initially melodic support, later off-key notes",
        "distractors": ["Harmonic embellishment", "Harmonic foundation", "Harmonic support", "Accompaniment"],
        "PI": 0.98,
    },
    "7": {
        "question": "What makes the track sound vintage?",
        "caption": "...",
        "correct_answer": "Effect",
        "distractors": ["Lo-fi", "Tape saturation", "Vinyl crackle", "Tape hiss"],
        "PI": 0.95,
    },
}
MMAU = [
    {
        "id": "m1",
        "audio_id": "./test-mini-audios/m1.wav",
        "question": "What is the genre?",
        "choices": ["Jazz", "Rock", "Pop", "Folk"],
        "answer": "Rock",
        "dataset": "MusicCaps",
        "task": "music",
        "split": "test-mini",
        "category": "Information Extraction",
        "sub-category": "Genre",
        "difficulty": "easy",
    },
    {
        "id": "s1",
        "audio_id": "./test-mini-audios/s1.wav",
        "question": "Who speaks?",
        "choices": ["Man", "Woman"],
        "answer": "Man",
        "task": "sound",
        "category": "Reasoning",
        "sub-category": "Acoustic Source Inference",
    },
]
MMAR = [
    {
        "id": "q1",
        "audio_path": "./audio/q1.wav",
        "question": "Which chord ends the piece?",
        "choices": ["Major", "Minor", "Diminished"],
        "answer": "Minor",
        "modality": "music",
        "category": "Perception",
        "sub-category": "Harmony",
        "language": "",
    },
    {
        "id": "q2",
        "audio_path": "./audio/q2.wav",
        "question": "How many speakers?",
        "choices": ["One", "Two"],
        "answer": "B",
        "modality": "speech",
        "category": "Semantic",
        "sub-category": "Counting",
    },
]


def write_csv(path, records):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def converted(tmp_path, benchmark, source, **options):
    out = tmp_path / f"{benchmark}_test.json"
    convert(benchmark, source, out, **options)
    rows, errors = load_choice_rows(out)
    assert errors == [] and load_rows(out)[1] == []  # also valid as plain rows (dr infer, dr data check)
    return rows


def back(row):
    """A converted row -> (question text, correct answer, the other options as a set, audio, categories)."""
    others = frozenset(o for j, o in enumerate(row.options) if j != row.answer)
    return row.options[row.answer], others, row.row.mm_paths, row.categories


def test_muchomusic_csv_round_trip(tmp_path):
    rows = converted(tmp_path, "muchomusic", write_csv(tmp_path / "muchomusic.csv", MUCHO_CSV))
    assert [back(r) for r in rows] == [
        (
            "Four on the floor.",
            frozenset({"Off-beat syncopation.", "Scat singing.", "E-guitar playing a simple melody."}),
            ("sdd/415600.wav",),
            ("reasoning: genre and style", "genre: Reggae"),
        ),
        (
            "Piano",
            frozenset({"Organ", "Drums", "Violin"}),
            ("musiccaps/-0Gj8-vB1q4.wav",),  # the YouTube id, as the repository derives it
            ("knowledge: melody", "knowledge: instrumentation"),
        ),
    ]
    first = rows[0]
    listed = "".join(f"({'ABCD'[j]}) {o} " for j, o in enumerate(first.options))
    assert (
        first.row.instruction == f"Question: {MUCHO_CSV[0]['question']}\n Options: {listed}\n The correct answer is: "
    )
    assert first.row.input == "<Audio>" and first.row.output == "Four on the floor."
    # shuffled with a fixed seed: a rerun gives the same order, and the correct answer is not always listed first
    assert converted(tmp_path, "muchomusic", tmp_path / "muchomusic.csv") == rows
    many = write_csv(tmp_path / "many.csv", [dict(MUCHO_CSV[1], id=str(i)) for i in range(12)])
    assert len({r.answer for r in converted(tmp_path, "muchomusic", many)}) > 1


def test_muchomusic_prepared_json_keeps_its_order_and_audio_path(tmp_path):
    prepared = [
        {
            "id": 415600,
            "prompt": "Question: What rhythm? Options: (A) Pop (B) Reggae (C) Rock (D) Ska The correct answer is: ",
            "answers": ["Pop music", "Reggae", "Latin rock", "Ska"],
            "answer_orders": [3, 0, 2, 1],
            "dataset": "sdd",
            "genre": "Reggae",
            "reasoning": ["genre and style"],
            "knowledge": [],
            "audio_path": "data/sdd/audio/00/415600.2min.mp3",
            "model_output": "A",
        }
    ]
    (tmp_path / "prepared.json").write_text(json.dumps(prepared))
    [row] = converted(tmp_path, "muchomusic", tmp_path / "prepared.json")
    assert row.options == ("Pop music", "Reggae", "Latin rock", "Ska") and row.answer == 1  # answer_orders.index(0)
    assert row.row.id == "415600" and row.row.mm_paths == ("data/sdd/audio/00/415600.2min.mp3",)
    assert row.row.instruction.startswith("Question: What rhythm?\n Options: (A) Pop music (B) Reggae ")


def test_rulistening_round_trip(tmp_path):
    (tmp_path / "RUL-MuchoMusic.json").write_text(json.dumps(RUL))
    rows = converted(tmp_path, "rulistening", tmp_path / "RUL-MuchoMusic.json")
    assert {r.row.id: back(r) for r in rows} == {
        qid: (q["correct_answer"], frozenset(q["distractors"]), (f"{qid}.mp3",), ()) for qid, q in RUL.items()
    }
    row = rows[0]
    head = "Provide your best guess of this question. Think step by step.\n\n"
    assert row.row.instruction.startswith(
        f"{head}Question: {RUL['1740']['question']}\n\nOptions: (A) {row.options[0]} (B) "
    )
    assert row.row.instruction.endswith("such as [[A]], [[B]], [[C]], [[D]] or [[E]].")


def test_rulistening_leave_one_out_groups(tmp_path):
    (tmp_path / "RUL-MuchoMusic.json").write_text(json.dumps(RUL))
    rows = converted(tmp_path, "rulistening", tmp_path / "RUL-MuchoMusic.json", leave_one_out=True)
    assert [r.row.id for r in rows[:4]] == [f"1740/loo{k}" for k in range(4)] and len(rows) == 8
    for k, r in enumerate(rows[:4]):  # distractor k left out, the correct answer always in
        left_out = RUL["1740"]["distractors"][k]
        assert r.group == "1740" and len(r.options) == 4 and left_out not in r.options
        assert r.options[r.answer] == RUL["1740"]["correct_answer"] and r.row.mm_paths == ("1740.mp3",)
    assert rows[0].row.instruction.endswith("such as [[A]], [[B]], [[C]], [[D]].")


@pytest.mark.parametrize("keep_all", [False, True])
def test_mmau_round_trip_keeps_music_unless_asked(tmp_path, keep_all):
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(MMAU))
    rows = converted(tmp_path, "mmau_music", tmp_path / "mmau-test-mini.json", keep_all=keep_all)
    expected = [
        (q["answer"], frozenset(set(q["choices"]) - {q["answer"]}), (q["audio_id"][2:],),
         (f"category: {q['category']}", f"sub-category: {q['sub-category']}"))
        for q in MMAU if keep_all or q["task"] == "music"
    ]  # fmt: skip
    assert [back(r) for r in rows] == expected
    assert [r.options for r in rows] == [tuple(q["choices"]) for q in MMAU][: len(rows)]  # the benchmark's own order
    assert rows[0].row.instruction == (
        "Listen to the audio and answer the following multiple-choice question. Respond with only the letter "
        "(A, B, C, or D) of the correct option.\nWhat is the genre?\nA. Jazz\nB. Rock\nC. Pop\nD. Folk\n"
        "The best answer is:"
    )


def test_mmar_round_trip_reads_text_or_letter_answers(tmp_path):
    (tmp_path / "MMAR-meta.json").write_text(json.dumps(MMAR))
    [music] = converted(tmp_path, "mmar_music", tmp_path / "MMAR-meta.json")
    assert back(music) == ("Minor", frozenset({"Major", "Diminished"}), ("audio/q1.wav",),
                           ("category: Perception", "sub-category: Harmony"))  # fmt: skip
    both = converted(tmp_path, "mmar_music", tmp_path / "MMAR-meta.json", keep_all=True)
    assert [r.options[r.answer] for r in both] == ["Minor", "Two"]  # "B" is the letter of "Two"


def test_catalog_names_the_converted_files(tmp_path):
    for name in ("muchomusic", "rulistening", "mmau_music", "mmar_music"):
        assert resolve_dataset(name, tmp_path).json_path == tmp_path / f"{name}_test.json"
    assert resolve_dataset("mmau_music", tmp_path).media_root == tmp_path / "MMAU"  # audio_id: test-mini-audios/...


@pytest.mark.parametrize(
    ("benchmark", "content", "message"),
    [
        ("mmau_music", [{"id": "a", "task": "music", "question": "q", "choices": ["x", "y"], "answer": "z",
                         "audio_id": "a.wav"}], r"mmau.json:0: answer 'z' is none of the 2 options"),
        ("mmau_music", [{"id": "a", "task": "music", "question": "q", "choices": "xy", "answer": "x"}],
         r"mmau.json:0: `choices` must be a list"),
        ("rulistening", {"9": {"question": "q", "correct_answer": "x"}}, r"mmau.json:9: `distractors` must be"),
        ("mmar_music", {"not": "a list"}, r"mmau.json: expected a JSON list"),
    ],
)  # fmt: skip
def test_malformed_files_fail_with_one_line_naming_file_and_row(tmp_path, benchmark, content, message):
    (tmp_path / "mmau.json").write_text(json.dumps(content))
    with pytest.raises(BenchmarkFormatError, match=message):
        convert(benchmark, tmp_path / "mmau.json", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_csv_row_errors_name_the_line(tmp_path):
    bad = [dict(MUCHO_CSV[0]), dict(MUCHO_CSV[1], correct_answer="")]
    with pytest.raises(BenchmarkFormatError, match=r"muchomusic.csv:3: no correct_answer field"):
        convert("muchomusic", write_csv(tmp_path / "muchomusic.csv", bad), tmp_path / "out.json")


def test_choice_keys_are_validated(tmp_path):
    rows = [
        dict(synth.make_row("a", [("audio", "a.wav")]), options=["x", "y"], answer=1, output="y"),
        dict(synth.make_row("b", [("audio", "b.wav")]), options=["x", "y"], answer=2, output="y"),
        dict(synth.make_row("c", [("audio", "c.wav")]), options=["x", "y"], answer=0, output="y"),
    ]
    path = synth.write_dataset(tmp_path, rows)
    good, errors = load_choice_rows(path)
    assert [r.row.id for r in good] == ["a"] and has_choices(path)
    assert errors == [
        f"{path}:1: id 'b': `answer` must be an index into the 2 options, got 2",
        f"{path}:2: id 'c': `output` must be the text of the correct option",
    ]


def test_classification_rows_use_the_distinct_answers_of_an_instruction(tmp_path):
    labels = ["The genre is jazz.", "The genre is rock.", "The genre is pop."]
    rows = [synth.make_row(f"g{i}", [("audio", f"{i}.wav")], "What genre?", labels[i % 3]) for i in range(6)]
    rows += [synth.make_row(f"f{i}", [("audio", f"{i}.wav")], "Describe it.", f"free text {i}") for i in range(3)]
    loaded, _ = load_rows(synth.write_dataset(tmp_path, rows))
    out = classification_rows(loaded)
    assert [r.row.id for r in out] == [f"g{i}" for i in range(6)]  # free-text answers are no label set
    assert all(r.options == tuple(labels) and r.options[r.answer] == r.row.output for r in out)


def test_dr_data_convert_writes_the_catalog_file(tmp_path):
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(MMAU))
    args = ["data", "convert", "mmau_music", str(tmp_path / "mmau-test-mini.json"), "--data-root", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows, _ = load_choice_rows(tmp_path / "mmau_music_test.json")
    assert [r.row.id for r in rows] == ["m1"] and "1 rows" in result.output
    assert "dr data check --dataset mmau_music" in result.output
    bad = CliRunner().invoke(app, ["data", "convert", "mmau_music", str(tmp_path / "nope.json")])
    assert bad.exit_code == 1 and "nope.json: no such file" in bad.output
