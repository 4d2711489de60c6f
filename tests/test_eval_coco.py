"""The captioning protocol: hand-worked corpus BLEU / ROUGE-L, pycocoevalcap called directly, and a missing Java."""

from __future__ import annotations

import math

import pytest

import eval as ev
from eval import coco, needs


def rows_and_preds(pairs: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    rows = [{"id": str(i), "instruction": "q", "output": ref} for i, (_, ref) in enumerate(pairs)]
    return rows, {str(i): {"q": cand} for i, (cand, _) in enumerate(pairs)}


@pytest.mark.slow
def test_corpus_bleu_and_rouge_worked_by_hand():
    # PTB tokenization lowercases and drops punctuation; counts are pooled over the corpus (7 words each side):
    # 1-grams 6/7, 2-grams 4/5, 3-grams 2/3, 4-grams 0/1; ROUGE-L F(beta=1.2) per pair 3/4 and 1, averaged.
    m = coco.scores(["The cat sat down.", "a red guitar"], ["the cat sat up", "A red guitar!"])
    assert m["bleu1"] == pytest.approx(6 / 7)
    assert m["bleu2"] == pytest.approx(math.sqrt(6 / 7 * 4 / 5))
    assert m["bleu3"] == pytest.approx((6 / 7 * 4 / 5 * 2 / 3) ** (1 / 3))
    assert m["bleu4"] == pytest.approx(0, abs=1e-3)
    assert m["rouge_l"] == pytest.approx(0.875)


@pytest.mark.slow
def test_matches_pycocoevalcap_with_unicode_and_empty_answers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    pairs = [
        ("A calm café tune, naïve and slow.", "A calm and slow café tune."),
        ("", "Loud drums."),
        ("Electric guitar leads", "The electric guitar leads the song"),
        ("音楽 piano", "piano music"),
    ]
    rows, preds = rows_and_preds(pairs)
    got = ev.evaluate(preds, rows, "coco", bertscore_model="/nonexistent/model")["metrics"]["coco"]
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r}] for i, (_, r) in enumerate(pairs)})
    res = tok.tokenize({i: [{"caption": c}] for i, (c, _) in enumerate(pairs)})
    meteor = Meteor()
    want = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], Bleu(4).compute_score(gts, res, verbose=0)[0], strict=True))
    want |= {
        "meteor_1_5": meteor.compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }
    del meteor
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["bertscore_f1"] is None and 0 < got["meteor_1_5"] < 1 and got["cider"] > 0


def test_missing_java_is_one_note_and_the_rest_is_computed(monkeypatch):
    monkeypatch.setattr(needs.shutil, "which", lambda name: None)
    rows, preds = rows_and_preds([("a slow piano piece", "a slow piano piece")])
    r = ev.evaluate(preds, rows, "all", bertscore_model="/nonexistent/model")
    assert all(v is None for v in r["metrics"]["coco"].values())
    assert r["metrics"]["music-llm"]["bleu_u_char"] == pytest.approx(1.0)
    assert r["metrics"]["music-llm"]["rouge_l_recall"] == pytest.approx(1.0)
    java_notes = [n for n in r["notes"] if "java" in n]
    assert len(java_notes) == 1 and "apt-get install -y default-jre-headless" in java_notes[0]
    assert len(r["notes"]) == 2  # and one for the BERTScore model, said once for both protocols
