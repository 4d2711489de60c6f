"""eval/choice.py: parsing rules on hand-written answers, the bootstrap interval against the normal approximation,
accuracy per category and chance, and the audio-ablation controls run end to end on the tiny model."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import synth

from eval.choice import (
    REFERENCE,
    ablate,
    accuracy,
    bootstrap_ci,
    control_audio,
    parse_answer,
    references,
    score_generative,
    score_likelihood,
)
from model.data.catalog import CATALOG, Row
from model.data.multiple_choice import ChoiceRow
from model.generate.likelihood import OptionScores
from model.media.preprocess import MediaError

OPTIONS = ["Rock", "Latin rock", "Jazz", "Pop music"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("[[C]]", 2),  # rule 1, RUListening's format
        ("Let me think. Maybe [[A]]... no: [[B]]", 1),  # rule 1: the last one
        ("B", 1),
        ("(D)", 3),
        ("c.", None),  # rule 2 wants an upper-case letter; "c" is no option text either
        ("C.", 2),
        ("B) Latin rock", 1),  # rule 3
        ("(A) Rock, clearly", 0),
        ("D: Pop music", 3),
        ("A guitar plays jazz chords", 2),  # "A" without a delimiter is a word, not a label; rule 6 finds "jazz"
        ("The correct answer is (C).", 2),  # rule 4
        ("I pick option B because of the congas", 1),
        ("The answer is E", None),  # rule 4: only four options; no text matches either
        ("latin ROCK!", 1),  # rule 5: case and punctuation ignored
        ("It is a latin rock song with congas.", 1),  # rule 6: "rock" inside "latin rock" does not count
        ("It sounds like pop music, maybe jazz.", None),  # two options named: unparsed
        ("Folk, probably.", None),
        ("", None),
    ],
)
def test_parsing_rules(answer, expected):
    assert parse_answer(answer, OPTIONS) == expected


def test_bootstrap_interval_matches_the_normal_approximation():
    # 120 right of 400: the normal approximation's 95% interval is p -/+ 1.96 sqrt(p (1 - p) / n) = 0.300 -/+ 0.0449;
    # the percentile bootstrap of a mean of 400 outcomes is close to it (within 0.006 at 10,000 resamples)
    correct = [True] * 120 + [False] * 280
    lo, hi = bootstrap_ci(correct)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert lo == pytest.approx(0.3 - half, abs=0.006) and hi == pytest.approx(0.3 + half, abs=0.006)
    assert bootstrap_ci(correct) == [lo, hi]  # seeded: reruns give the same interval
    assert bootstrap_ci([True] * 10) == [1.0, 1.0] and bootstrap_ci([]) == [None, None]


def test_bootstrap_equals_resampling_the_outcomes_by_index():
    # the binomial shortcut against the textbook bootstrap (resample indices, take means), both with numpy, on a
    # small case: the two intervals agree to the resampling noise
    correct = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1] * 5, dtype=float)
    rng = np.random.default_rng(7)
    means = correct[rng.integers(0, len(correct), size=(20_000, len(correct)))].mean(axis=1)
    textbook = np.percentile(means, [2.5, 97.5])
    np.testing.assert_allclose(bootstrap_ci(list(correct.astype(bool))), textbook, atol=0.02)


def test_accuracy_per_category_and_chance():
    correct = [True, False, True, True]
    cats = [("genre: rock",), ("genre: rock", "reasoning: mood"), (), ("reasoning: mood",)]
    report = accuracy(correct, cats, options=[4, 4, 2, 5])
    assert report["accuracy"] == 0.75 and report["n"] == 4 and report["correct"] == 3
    assert report["chance"] == pytest.approx((0.25 + 0.25 + 0.5 + 0.2) / 4)
    assert {k: (v["accuracy"], v["n"]) for k, v in report["categories"].items()} == {
        "genre: rock": (0.5, 2),
        "reasoning: mood": (0.5, 2),
    }


def choice_rows(n: int = 3) -> list[ChoiceRow]:
    rows = []
    for i in range(n):
        row = Row(f"q{i}", "<Audio>", f"Question {i}?", OPTIONS[i % 4], ("audio",), (f"a{i}.wav",))
        rows.append(ChoiceRow(row, tuple(OPTIONS), i % 4, (f"group: {i % 2}",)))
    return rows


def test_generative_scores_count_unparsed_and_missing():
    rows = choice_rows(3)
    predictions = {"q0": {"Question 0?": "(A) Rock"}, "q1": {"Question 1?": "no idea"}}
    report = score_generative(predictions, rows)
    assert (report["accuracy"], report["n"], report["unparsed"], report["missing"]) == (0.5, 2, 1, 1)


def test_leave_one_out_groups_vote():
    # one question asked three times: picks "Jazz", "Jazz", unparsed -> "Jazz" (correct); a second asked twice:
    # "Rock" once, "Pop music" once -> a tie, settled by the first vote ("Rock", wrong: the answer is "Pop music")
    def asked(qid, k, answer):
        row = Row(f"{qid}/loo{k}", "<Audio>", f"{qid} {k}?", answer, ("audio",), ("a.wav",))
        return ChoiceRow(row, tuple(OPTIONS), OPTIONS.index(answer), (), qid)

    rows = [
        asked("q", 0, "Jazz"),
        asked("q", 1, "Jazz"),
        asked("q", 2, "Jazz"),
        asked("p", 0, "Pop music"),
        asked("p", 1, "Pop music"),
    ]
    predictions = {r.row.id: {r.row.instruction: a} for r, a in zip(rows, ["C", "jazz", "?", "Rock", "D"], strict=True)}
    report = score_generative(predictions, rows)
    assert (report["n"], report["correct"], report["unparsed"]) == (2, 1, 1)


def test_likelihood_scores_give_acc_and_acc_norm():
    # row 0: total picks 0 ("Rock", correct); per character picks 3 ("Pop music"). row 1: both pick 1 (correct)
    scores = [
        OptionScores((-2.0, -9.0, -9.0, -2.5), (1, 2, 1, 2), (4, 10, 4, 9)),
        OptionScores((-9.0, -1.0, -9.0, -9.0), (1, 2, 1, 2), (4, 10, 4, 9)),
        MediaError("a2.wav", "missing"),
    ]
    out = score_likelihood(scores, choice_rows(3))
    assert out["likelihood"]["accuracy"] == 1.0 and out["likelihood (norm)"]["accuracy"] == 0.5
    assert out["likelihood"]["missing"] == 1 and out["likelihood"]["n"] == 2


def test_references_are_marked_and_keep_their_sources():
    rows = references("muchomusic", [{"dataset": "muchomusic", "model": "Mine", "accuracy": 40.0, "source": "me"}])
    assert rows and all(r["computed_here"] is False and r["source"] for r in rows)
    assert "Mine" in [r["model"] for r in rows] and references("nope") == []


def test_every_built_in_reference_row_has_a_source_a_reader_can_open():
    from urllib.parse import urlsplit

    for r in REFERENCE:
        assert isinstance(r["source"], str) and r["source"].strip(), r
        url = urlsplit(r["url"])
        assert url.scheme == "https" and url.netloc and " " not in r["url"], r
        assert (r["dataset"], "test") in CATALOG and 0 < r["accuracy"] < 100, r
        if r["dataset"] == "mmau_music":  # MMAU scores differ by version: each row names its own
            assert r["version"] in r["source"], r


def test_reference_rows_hold_the_verified_values():
    """Issue 27's checked values: no MuChoMusic row for Qwen2.5-Omni (its 52.0 was Qwen3-Omni on RUL-MuchoMusic),
    GTZAN Qwen2.5-Omni 81.7, and Qwen2-Audio's MMAU music by version."""
    table = {(r["dataset"], r["model"], r.get("version")): r["accuracy"] for r in REFERENCE}
    assert not any(d == "muchomusic" and m.startswith("Qwen2.5-Omni") for d, m, _ in table)
    assert table["rulistening", "Qwen3-Omni-30B-A3B-Instruct", None] == 52.0
    assert table["rulistening", "Qwen2.5-Omni-7B", None] == 47.3
    assert table["gtzan", "Qwen2.5-Omni-7B", None] == 81.7
    assert table["mmau_music", "Qwen2-Audio-Instruct", "original test-mini"] == 50.98
    assert table["mmau_music", "Qwen2-Audio-Instruct", "v05.15.25"] == 56.29
    assert len(table) == len(REFERENCE)  # no row twice


def test_control_audio_files(tmp_path):
    silence, noise = control_audio("silence", tmp_path), control_audio("noise", tmp_path)
    s, rate = sf.read(silence)
    n, _ = sf.read(noise)
    assert rate == 16000 and len(s) == len(n) == 160000
    assert not s.any() and 0.08 < n.std() < 0.12
    rows = ablate(choice_rows(2), noise)
    assert [r.row.mm_paths for r in rows] == [(str(noise),)] * 2 and rows[0].options == tuple(OPTIONS)


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_controls_run_through_both_modes(tiny_layout, tmp_path, kind):
    """The same questions with control audio, through the likelihood scorer and the generative path (run_inference):
    every row is answered or scored, none fails on its media, and the inputs really are the control audio."""
    from model.config import GenerationConfig
    from model.generate.likelihood import score_rows
    from model.infer.job import run_inference
    from model.infer.journal import write_results
    from model.media.features import FeatureCache
    from model.network.checkpoint import load_model

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    for i in range(3):
        synth.write_wav(tmp_path / f"a{i}.wav", 1.0, 220 * (i + 1))
    control = control_audio(kind, tmp_path / "controls")
    rows = ablate(choice_rows(3), control)
    cache = FeatureCache.for_encoder(tmp_path / "cache", model.visual_encoder)
    scores = score_rows(model, rows, tmp_path, cache, batch_size=2)
    assert all(isinstance(s, OptionScores) for s in scores)
    # the scores are those of the control file itself given as each row's audio, and not those of the real audio
    shutil.copy(control, tmp_path / "copy.wav")
    copied = [replace(r, row=replace(r.row, mm_paths=("copy.wav",))) for r in choice_rows(3)]
    from_copy = [s.logprobs for s in score_rows(model, copied, tmp_path, None, 3)]
    np.testing.assert_allclose(from_copy, [s.logprobs for s in scores], atol=1e-5)
    real = score_rows(model, choice_rows(3), tmp_path, cache, batch_size=2)
    assert all(a.logprobs != b.logprobs for a, b in zip(real, scores, strict=True))
    report = score_likelihood(scores, rows)
    assert report["likelihood"]["n"] == 3 and report["likelihood"]["missing"] == 0

    out = tmp_path / "gen" / "answers.json"
    greedy = GenerationConfig(max_new_tokens=4, do_sample=False)
    summary = run_inference(model, [r.row for r in rows], tmp_path, out, greedy, 2, cache)
    assert summary.failed == [] and summary.answered == 3
    report = score_generative(write_results(out, [r.row for r in rows]), rows)
    assert report["n"] == 3 and report["missing"] == 0
    assert json.loads(out.read_text())
