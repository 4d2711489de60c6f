"""Predictions and references in, aligned pairs out: the one place that decides which rows are scored."""

from __future__ import annotations

from pathlib import Path


def dataset_path(dataset: str | Path, data_root: str | Path = "data") -> Path:
    """A JSON file as given, else the test file of a catalog name (model.data.catalog); DatasetError names the
    choices."""
    from model.data.catalog import resolve_dataset  # imported here: it pulls in the media stack (torch, av)

    return resolve_dataset(dataset, data_root, split="test").json_path


def load_json(path: str | Path) -> object:
    """A JSON file; an unreadable, empty, malformed or too deeply nested one is one ValueError line naming it
    (model.data.catalog.read_json, the one reader of the project's JSON inputs)."""
    from model.data.catalog import read_json  # imported here: it pulls in the media stack (torch, av)

    return read_json(path)


def read_predictions(path: str | Path) -> dict[str, dict[str, object]]:
    """A prediction file as `dr infer` writes it, `{id: {instruction: answer}}`; any other shape (a list, `{id:
    answer}`, a string, null) is one ValueError line naming the file and what is there instead."""
    path = Path(path)
    data = load_json(path)
    want = "{id: {instruction: answer}} as `dr infer` writes it"
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {want}, got {_kind(data)}")
    for row_id, answers in data.items():
        if not isinstance(answers, dict):
            raise ValueError(f"{path}: expected {want}, but id {row_id!r} holds {_kind(answers)}")
    return data


def read_references(path: str | Path) -> list[dict]:
    """A dataset file's rows (id, instruction, output); other shapes are one ValueError line naming the file."""
    path = Path(path)
    rows = load_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {_kind(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "output")):
            raise ValueError(f"{path}:{i}: a row needs an instruction and an output, got {_kind(row)}")
    return rows


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value[:30]!r})"
    return {dict: "an object", list: "a list", bool: "a boolean"}.get(type(value), f"a {type(value).__name__}")


def pair(predictions: dict[str, dict[str, str]], rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """Candidates and references of the rows that have an answer, keyed by (id, instruction) as `dr infer` writes.

    Rows without an answer and answers without a row are counted (and the rows listed), never silently dropped; an
    answer that is not a string (a number, null, a list) is counted apart (`not_text`), so the report says why.
    """
    keys = [
        (str(row.get("id", i)), row["instruction"]) for i, row in enumerate(rows)
    ]  # no id: its index (model.data.catalog)
    cands, refs, missing, not_text = [], [], [], []
    for (row_id, instruction), row in zip(keys, rows, strict=True):
        answers = predictions.get(row_id, {})
        answer = answers.get(instruction)
        if isinstance(answer, str):
            cands.append(answer)
            refs.append(row["output"])
        else:
            missing.append({"id": row_id, "instruction": instruction})
            if instruction in answers:
                not_text.append({"id": row_id, "instruction": instruction, "type": type(answer).__name__})
    known = set(keys)
    extra = sum((i, q) not in known for i, answers in predictions.items() for q in answers)
    counts = {"rows": len(rows), "scored": len(cands), "missing": len(missing), "unmatched_predictions": extra}
    if not_text:
        counts["not_text"] = len(not_text)
    return cands, refs, {**counts, "missing_rows": missing, **({"not_text_rows": not_text} if not_text else {})}
