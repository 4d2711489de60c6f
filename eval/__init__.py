"""Metrics of the paper and the published peer tables, computed offline: `evaluate(predictions, rows, protocol)`."""

from eval.bertscore import DEFAULT_MODEL
from eval.inputs import dataset_path, load_json, pair, read_predictions, read_references
from eval.protocols import LABELS, PROTOCOLS, evaluate

__all__ = [
    "DEFAULT_MODEL",
    "LABELS",
    "PROTOCOLS",
    "dataset_path",
    "evaluate",
    "load_json",
    "pair",
    "read_predictions",
    "read_references",
]
