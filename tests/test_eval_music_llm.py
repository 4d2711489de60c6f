"""The music-LLM protocol against hand-worked values and direct calls of NLTK / rouge-score (M2UGen's recipe)."""

from __future__ import annotations

import math
from statistics import fmean

import pytest
from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import sentence_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score.rouge_scorer import RougeScorer

import eval as ev
from eval import music_llm

ROWS = [
    {"id": "1", "instruction": "Describe it.", "output": "A slow piano piece with soft strings."},
    {"id": "2", "instruction": "Which instrument?", "output": "The electric guitar leads the song."},
]
PRED = {"1": {"Describe it.": "A slow piano piece with gentle strings."}, "2": {"Which instrument?": "A guitar."}}


def music(preds: dict, rows: list[dict] = ROWS) -> dict:
    return ev.evaluate(preds, rows, "music-llm", bertscore_model="/nonexistent/model")


def test_bleu_counts_characters_not_words():
    # every n-gram of the candidate is in the reference, so BLEU is the brevity penalty exp(1 - r/c) alone:
    # 17 vs 21 characters (spaces count) at character level, 5 vs 6 words at word level.
    cand, ref = "the cat sat on it", "the cat sat on it now"
    assert music_llm.bleu_char(cand, ref) == pytest.approx(math.exp(1 - 21 / 17))
    assert music_llm.bleu_char(cand, ref, (0, 0, 0, 1)) == pytest.approx(math.exp(1 - 21 / 17))
    assert sentence_bleu([ref.split()], cand.split()) == pytest.approx(math.exp(1 - 6 / 5))  # word level differs
    # one "word" that differs: zero at word level, but most character n-grams match
    assert music_llm.bleu_char("abcd", "abcde") == pytest.approx(math.exp(1 - 5 / 4))


def test_rouge_l_is_stemmed_recall():
    assert music_llm.bleu_rouge(["the cat on the mat"], ["the cat sat on the mat"])["rouge_l_recall"] == 5 / 6
    assert music_llm.bleu_rouge(["a cat plays"], ["two cats playing"])["rouge_l_recall"] == pytest.approx(2 / 3)


def test_meteor_of_identical_sentence_is_one_minus_fragmentation_penalty():
    s = "a calm piano piece in c major"  # 7 tokens, one chunk: penalty 0.5 * (1/7)^3
    assert music_llm.meteor([s], [s])["meteor"] == pytest.approx(1 - 0.5 / 7**3)


def test_protocol_matches_direct_library_calls_averaged_over_rows():
    cands = [PRED[r["id"]][r["instruction"]] for r in ROWS]
    refs = [r["output"] for r in ROWS]
    rouge = RougeScorer(["rougeL"], use_stemmer=True)
    m = music(PRED)["metrics"]["music-llm"]
    assert m["bleu_u_char"] == pytest.approx(fmean(sentence_bleu([r], c) for c, r in zip(cands, refs, strict=True)))
    assert m["bleu4_char"] == pytest.approx(
        fmean(sentence_bleu([r], c, weights=(0, 0, 0, 1)) for c, r in zip(cands, refs, strict=True))
    )
    assert m["meteor"] == pytest.approx(
        fmean(meteor_score([wordpunct_tokenize(r)], wordpunct_tokenize(c)) for c, r in zip(cands, refs, strict=True))
    )
    assert m["rouge_l_recall"] == pytest.approx(
        fmean(rouge.score(r, c)["rougeL"].recall for c, r in zip(cands, refs, strict=True))
    )
    assert 0 < m["bleu4_char"] < m["bleu_u_char"] < 1


def test_empty_answer_scores_zero_and_counts():
    m = music({"1": {"Describe it.": ""}, "2": {"Which instrument?": ""}})
    assert m["counts"]["scored"] == 2
    assert {k: m["metrics"]["music-llm"][k] for k in ("bleu_u_char", "bleu4_char", "meteor", "rouge_l_recall")} == {
        "bleu_u_char": 0,
        "bleu4_char": 0,
        "meteor": 0,
        "rouge_l_recall": 0,
    }


def test_unicode_is_scored_per_character():
    rows = [{"id": "u", "instruction": "q", "output": "Café naïve — 音楽です"}]
    m = music({"u": {"q": "Café naïve — 音楽です"}}, rows)["metrics"]["music-llm"]
    assert m["bleu_u_char"] == pytest.approx(1.0) and m["bleu4_char"] == pytest.approx(1.0)
    assert m["meteor"] == pytest.approx(
        meteor_score([wordpunct_tokenize(rows[0]["output"])], wordpunct_tokenize(rows[0]["output"]))
    )
    # rouge-score's tokenizer keeps [a-z0-9] only: the Japanese word is invisible to it, as in the published recipe
    assert m["rouge_l_recall"] == pytest.approx(1.0)
    assert music_llm.bleu_rouge(["音楽"], ["音楽"])["rouge_l_recall"] == 0


def test_missing_bertscore_model_keeps_the_other_metrics():
    r = music(PRED)
    assert r["metrics"]["music-llm"]["bertscore_recall"] is None
    assert all(r["metrics"]["music-llm"][k] is not None for k in ("bleu_u_char", "meteor", "rouge_l_recall"))
    assert len(r["notes"]) == 1 and "/nonexistent/model" in r["notes"][0] and "--bertscore-model" in r["notes"][0]


def test_evaluate_reports_each_metric_step_before_it_runs():
    """The progress a long `dr eval` shows: every step of the protocol named before it runs, then the end."""
    import eval as metrics

    rows = [{"id": "a", "instruction": "q", "output": "a calm piano piece"}]
    predictions = {"a": {"q": "a calm piano song"}}
    steps = []
    report = metrics.evaluate(
        predictions, rows, "music-llm", "/nonexistent-bertscore", on_step=lambda *s: steps.append(s)
    )
    assert steps == [
        ("music-llm: BLEU / ROUGE-L", 0, 3),
        ("music-llm: METEOR", 1, 3),
        ("music-llm: BERTScore", 2, 3),
        ("done", 3, 3),
    ]
    assert report["metrics"]["music-llm"]["bleu4_char"] is not None
