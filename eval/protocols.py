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


def _steps(protocol: str, cands: list[str], refs: list[str], bert: Callable[[], dict]) -> list[Callable[[], dict]]:
    if protocol == "music-llm":
        return [
            lambda: music_llm.bleu_rouge(cands, refs),
            lambda: music_llm.meteor(cands, refs),
            lambda: {"bertscore_recall": bert()["recall"]},
        ]
    return [lambda: coco.scores(cands, refs), lambda: {"bertscore_f1": bert()["f1"]}]


def evaluate(
    predictions: dict[str, dict[str, str]],
    references: list[dict],
    protocol: str = "music-llm",
    bertscore_model: str | Path = DEFAULT_MODEL,
) -> dict:
    """Score `{id: {instruction: answer}}` against dataset rows (`id`, `instruction`, `output`).

    Returns {"counts", "metrics": {protocol: {key: value or None}}, "notes": [why a metric is None], "bertscore"}.
    """
    protocols = PROTOCOLS if protocol == "all" else (protocol,)
    if not set(protocols) <= set(PROTOCOLS):
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)} or all")
    cands, refs, counts = pair(predictions, references)
    bert = cache(lambda: bertscore(cands, refs, bertscore_model))  # shared by both protocols: one model load
    metrics, notes = {}, []
    for name in protocols:
        values = dict.fromkeys(LABELS[name])
        for step in _steps(name, cands, refs, bert) if cands else []:
            try:
                values.update(step())
            except Missing as e:
                notes += [str(e)] if str(e) not in notes else []
        metrics[name] = values
    if not cands:
        notes.append(f"nothing scored: none of the {counts['rows']} dataset rows has a prediction")
    report = {"counts": counts, "metrics": metrics, "notes": notes, "bertscore": {"model": str(bertscore_model)}}
    if bert.cache_info().currsize:
        report["bertscore"]["num_layers"] = bert()["num_layers"]
    return report
