"""Predictions and references in, aligned pairs out: the one place that decides which rows are scored."""

from __future__ import annotations

import json
from pathlib import Path


def dataset_path(dataset: str | Path, data_root: str | Path = "data") -> Path:
    """A JSON file as given, else the test file of a catalog name (model.data); DatasetError names the choices."""
    from model.data import resolve_dataset  # imported here: it pulls in the media stack (torch, av)

    return resolve_dataset(dataset, data_root, split="test").json_path


def load_json(path: str | Path) -> dict | list:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pair(predictions: dict[str, dict[str, str]], rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """Candidates and references of the rows that have an answer, keyed by (id, instruction) as `dr infer` writes.

    Rows without an answer and answers without a row are counted (and the rows listed), never silently dropped.
    """
    keys = [(str(row.get("id", i)), row["instruction"]) for i, row in enumerate(rows)]  # no id: its index (model.data)
    cands, refs, missing = [], [], []
    for (row_id, instruction), row in zip(keys, rows, strict=True):
        answer = predictions.get(row_id, {}).get(instruction)
        if isinstance(answer, str):
            cands.append(answer)
            refs.append(row["output"])
        else:
            missing.append({"id": row_id, "instruction": instruction})
    known = set(keys)
    extra = sum((i, q) not in known for i, answers in predictions.items() for q in answers)
    counts = {"rows": len(rows), "scored": len(cands), "missing": len(missing), "unmatched_predictions": extra}
    return cands, refs, {**counts, "missing_rows": missing}
