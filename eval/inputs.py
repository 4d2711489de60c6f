"""Predictions and references in, aligned pairs out: the one place that decides which rows are scored."""

from __future__ import annotations

import json
from pathlib import Path


def dataset_path(dataset: str | Path, data_root: str | Path = "data") -> Path:
    """A JSON file as given, else a catalog name read as `<data_root>/<name>_test.json` (the original's layout)."""
    p = Path(dataset)
    return p if p.suffix == ".json" or p.is_file() else Path(data_root) / f"{dataset}_test.json"


def load_json(path: str | Path) -> dict | list:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pair(predictions: dict[str, dict[str, str]], rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """Candidates and references of the rows that have an answer, keyed by (id, instruction) as `dr infer` writes.

    Rows without an answer and answers without a row are counted (and the rows listed), never silently dropped.
    """
    cands, refs, missing = [], [], []
    for row in rows:
        answer = predictions.get(str(row["id"]), {}).get(row["instruction"])
        if isinstance(answer, str):
            cands.append(answer)
            refs.append(row["output"])
        else:
            missing.append({"id": row["id"], "instruction": row["instruction"]})
    known = {(str(r["id"]), r["instruction"]) for r in rows}
    extra = sum((i, q) not in known for i, answers in predictions.items() for q in answers)
    counts = {"rows": len(rows), "scored": len(cands), "missing": len(missing), "unmatched_predictions": extra}
    return cands, refs, {**counts, "missing_rows": missing}
