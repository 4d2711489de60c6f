"""Multiple-choice rows in dr's row format, and their loader (model/data/benchmarks.py converts each benchmark's
published file to them).

A multiple-choice row is an ordinary row (`model.data.catalog.Row`: `dr infer`, `dr data check` and the text metrics
work on it unchanged) with three more keys:

- `options`: the answer texts in the order the prompt lists them,
- `answer`: the 0-based index of the correct one (`output` is its text),
- `categories`: `"group: value"` labels (e.g. `"reasoning: genre and style"`), scored separately by `dr eval`,
- optionally `group`: rows of one group are one question asked with different option subsets, scored by majority
  vote (RUListening's leave-one-out evaluation).

`instruction` holds the question with its options as the benchmark's own prompt template lists them, so that the
generative mode asks what the benchmark asks; the likelihood mode scores the option texts after that same prompt.
Audio is not shipped: `mm_paths` are relative to the benchmark's audio folder (the catalog's media root, or
`--media-root`), and `dr data check` lists what is missing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model.data.catalog import Row, load_rows, read_json


@dataclass(frozen=True)
class ChoiceRow:
    """A validated multiple-choice row: the row itself, its options, the correct index and its categories; rows
    with the same `group` ask one question several times (leave-one-out) and are scored by majority vote."""

    row: Row
    options: tuple[str, ...]
    answer: int
    categories: tuple[str, ...] = ()
    group: str | None = None


def _choice_fields(raw: dict) -> tuple[tuple[str, ...], int, tuple[str, ...], str | None]:
    """The multiple-choice keys of one raw row, or ValueError saying what is wrong."""
    options, answer, categories = raw.get("options"), raw.get("answer"), raw.get("categories", [])
    group = raw.get("group")
    if group is not None and not isinstance(group, str):
        raise ValueError("`group` must be a string")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise ValueError("`options` must be a list of at least two non-empty strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        raise ValueError(f"`answer` must be an index into the {len(options)} options, got {answer!r}")
    if raw.get("output") != options[answer]:
        raise ValueError("`output` must be the text of the correct option")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ValueError("`categories` must be a list of strings")
    return tuple(options), answer, tuple(categories), group


def has_choices(path: str | Path) -> bool:
    """Whether a row file is a multiple-choice one (its first row has `options`)."""
    raw = read_json(Path(path))
    return isinstance(raw, list) and bool(raw) and isinstance(raw[0], dict) and "options" in raw[0]


def load_choice_rows(path: str | Path) -> tuple[list[ChoiceRow], list[str]]:
    """Rows validated as `model.data.catalog.load_rows` does, plus the multiple-choice keys -> (rows, `file:row:
    reason` lines)."""
    path = Path(path)
    rows, errors = load_rows(path)
    raw_rows = read_json(path)
    by_key = {(r.id, r.instruction): r for r in rows}
    out: list[ChoiceRow] = []
    for i, raw in enumerate(raw_rows):
        if not isinstance(raw, dict):
            continue
        row = by_key.pop((str(raw.get("id", i)), raw.get("instruction")), None)
        if row is None:  # invalid as a row: load_rows has said why
            continue
        try:
            out.append(ChoiceRow(row, *_choice_fields(raw)))
        except ValueError as e:
            errors.append(f"{path}:{i}: id {row.id!r}: {e}")
    return out, errors


def classification_rows(rows: Sequence[Row], max_labels: int = 50) -> list[ChoiceRow]:
    """Zero-shot classification over a captioning-style test set: each row's options are the distinct answers given
    to its instruction anywhere in the set (gtzan: the genre sentences), the correct one its own answer.

    An instruction whose answers are all different (free text) or more than `max_labels` (multi-label tag lists, as
    mtg's can be) is no classification: its rows are left out, and none left means the set is not one.
    """
    labels: dict[str, dict[str, None]] = {}
    counts = Counter(row.instruction for row in rows)
    for row in rows:
        labels.setdefault(row.instruction, {})[row.output] = None
    out = []
    for row in rows:
        options = list(labels[row.instruction])
        if 2 <= len(options) <= max_labels and len(options) < counts[row.instruction]:
            out.append(ChoiceRow(row, tuple(options), options.index(row.output), ()))
    return out
