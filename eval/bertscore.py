"""BERTScore from a local model folder or the Hugging Face cache, never a silent 50 s of hub retries.

Defaults follow the published tables: roberta-large at bert-score's layer 17, no idf, no baseline rescaling.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from eval.needs import Missing
from model.io.files import hub_offline

DEFAULT_MODEL = "roberta-large"


def _hub_reachable() -> bool:
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def locate(model: str | Path) -> tuple[str, int]:
    """(what to load, which layer): a folder as is, a hub name from the local cache, else the hub when reachable.

    The layer is bert-score's tuned one for known names (a folder named like a known model counts), else the
    model's last layer, since bert-score refuses unknown model types without `num_layers`.
    """
    from huggingface_hub import try_to_load_from_cache

    name, path = str(model), Path(model)
    if not path.is_dir():
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a repo id either: a folder that is not there
            raise Missing(f"BERTScore skipped: no model folder {name}; pass --bertscore-model /path/to/model") from None
        if not isinstance(cached, str) and not _hub_reachable():
            raise Missing(
                f"BERTScore skipped: model {name!r} is neither a folder nor in the Hugging Face cache and the hub is "
                f"unreachable; fetch it once (`hf download {name}`) or pass --bertscore-model /path/to/model"
            )
        path = Path(cached) if isinstance(cached, str) else None
    from bert_score.utils import model2layers  # imported late: it loads torch, seconds for a metric that is skipped

    if path is None:  # from the hub
        return name, model2layers.get(name) or _last_layer(name)
    path = path.parent if path.is_file() else path
    layers = model2layers.get(name, model2layers.get(path.name))
    return str(path), layers or json.loads((path / "config.json").read_text())["num_hidden_layers"]


def _last_layer(name: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name).num_hidden_layers


def score(cands: list[str], refs: list[str], model: str | Path = DEFAULT_MODEL) -> dict:
    """Mean precision, recall and F1, plus the model and layer used (for the report)."""
    import torch
    from bert_score import BERTScorer
    from transformers import AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    source, layers = locate(model)
    try:
        scorer = BERTScorer(model_type=source, num_layers=layers)
    except OSError as e:
        raise Missing(f"BERTScore skipped: cannot load {source!r} ({e}); pass --bertscore-model /path/to/model") from e
    if isinstance(scorer._tokenizer, (GPT2Tokenizer, RobertaTokenizer)):
        # bert-score passes add_prefix_space=True to encode(); transformers 5 ignores it there, so set it at load
        # time to get the tokens behind the published (transformers 4) numbers.
        scorer._tokenizer = AutoTokenizer.from_pretrained(source, add_prefix_space=True)
    # bert-score gives 0 to a pair with an empty side but crashes on one under transformers 5: zero them here.
    keep = [i for i, (c, r) in enumerate(zip(cands, refs, strict=True)) if c.strip() and r.strip()]
    prf = torch.zeros(3, len(cands))
    if keep:
        prf[:, keep] = torch.stack(scorer.score([cands[i] for i in keep], [refs[i] for i in keep]))
    p, r, f = prf.mean(1).tolist()
    return {"precision": p, "recall": r, "f1": f, "model": str(model), "num_layers": layers}
