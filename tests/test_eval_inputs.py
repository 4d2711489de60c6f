"""Which rows are scored: predictions keyed by (id, instruction); gaps on either side are counted, not dropped."""

from __future__ import annotations

import json

import pytest

import eval as ev

ROWS = [
    {"id": "a", "instruction": "q1", "output": "r1"},
    {"id": "a", "instruction": "q2", "output": "r2"},
    {"id": 7, "instruction": "q1", "output": "r3"},
    {"instruction": "q3", "output": "r4"},  # no id: its index, "3", as model.data.catalog does
]


def test_pair_keys_by_id_and_instruction_and_counts_gaps():
    preds = {"a": {"q2": "c2", "q9": "stray"}, "7": {"q1": "c3"}, "3": {"q3": "c4"}, "zz": {"q1": "stray"}}
    cands, refs, counts = ev.pair(preds, ROWS)
    assert (cands, refs) == (["c2", "c3", "c4"], ["r2", "r3", "r4"])
    assert counts == {
        "rows": 4,
        "scored": 3,
        "missing": 1,
        "unmatched_predictions": 2,
        "missing_rows": [{"id": "a", "instruction": "q1"}],
    }


def test_no_predictions_scores_nothing_and_says_so():
    r = ev.evaluate({}, ROWS, "all", bertscore_model="/nonexistent/model")
    assert r["counts"]["scored"] == 0 and r["counts"]["missing"] == 4
    assert all(v is None for m in r["metrics"].values() for v in m.values())
    assert set(r["metrics"]) == {"music-llm", "coco"}
    assert r["notes"] == ["nothing scored: none of the 4 dataset rows has a prediction"]


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown protocol"):
        ev.evaluate({}, ROWS, "bleurt")


def test_dataset_is_a_file_or_a_catalog_name(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(ROWS))
    assert ev.dataset_path(str(f), "elsewhere") == f
    assert ev.dataset_path("musicqa", tmp_path) == tmp_path / "musicqa_test.json"
    from model.data.catalog import DatasetError

    with pytest.raises(DatasetError, match="musicqa"):
        ev.dataset_path("no_such_set", tmp_path)
