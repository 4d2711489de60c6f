"""Protocol name -> metric steps; a step whose requirement is missing leaves its metrics null plus one note."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

from eval import coco, music_llm
from eval.bertscore import DEFAULT_MODEL
from eval.bertscore import score as bertscore
from eval.inputs import pair
from eval.needs import Missing

LABELS = {"music-llm": music_llm.LABELS, "coco": coco.LABELS}
PROTOCOLS = tuple(LABELS)


def _steps(protocol: str, cands: list[str], refs: list[str], bert: Callable[[], dict]) -> list[tuple[str, Callable]]:
    """(name, step) pairs: each step computes some of a protocol's metrics over every row."""
    if protocol == "music-llm":
        return [
            ("BLEU / ROUGE-L", lambda: music_llm.bleu_rouge(cands, refs)),
            ("METEOR", lambda: music_llm.meteor(cands, refs)),
            ("BERTScore", lambda: {"bertscore_recall": bert()["recall"]}),
        ]
    return [("COCO metrics", lambda: coco.scores(cands, refs)), ("BERTScore", lambda: {"bertscore_f1": bert()["f1"]})]


def evaluate(
    predictions: dict[str, dict[str, str]],
    references: list[dict],
    protocol: str = "music-llm",
    bertscore_model: str | Path = DEFAULT_MODEL,
    on_step: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Score `{id: {instruction: answer}}` against dataset rows (`id`, `instruction`, `output`). `on_step(name, done,
    total)` is told before each metric step over all rows (minutes each on 100k rows) and once when all are done.

    Returns {"counts", "metrics": {protocol: {key: value or None}}, "notes": [why a metric is None], "bertscore"}.
    """
    protocols = PROTOCOLS if protocol == "all" else (protocol,)
    if not set(protocols) <= set(PROTOCOLS):
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)} or all")
    cands, refs, counts = pair(predictions, references)
    bert = cache(lambda: bertscore(cands, refs, bertscore_model))  # shared by both protocols: one model load
    metrics, notes = {}, []
    steps = [(name, step) for name in protocols for step in (_steps(name, cands, refs, bert) if cands else [])]
    for name in protocols:
        metrics[name] = dict.fromkeys(LABELS[name])
    for done, (name, (label, step)) in enumerate(steps):
        if on_step:
            on_step(f"{name}: {label}", done, len(steps))
        try:
            metrics[name].update(step())
        except Missing as e:
            notes += [str(e)] if str(e) not in notes else []
    if on_step:
        on_step("done", len(steps), len(steps))
    if not cands:
        notes.append(f"nothing scored: none of the {counts['rows']} dataset rows has a prediction")
    report = {"counts": counts, "metrics": metrics, "notes": notes, "bertscore": {"model": str(bertscore_model)}}
    if bert.cache_info().currsize:
        report["bertscore"]["num_layers"] = bert()["num_layers"]
    return report
