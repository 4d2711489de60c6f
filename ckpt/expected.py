"""What a valid delta and ImageBind file contain: the original's key names and the shape rules between pieces.

Rules are relative (hidden size and layer count from the base config, vocab = base tokenizer + the added tokens,
encoder dim from ImageBind's heads), so the same checks accept the 7B set and the tiny test sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.text import tokenizer

Shapes = dict[str, tuple[int, ...]]

LLM = "llama_model.base_model.model."
EMBED = LLM + "model.embed_tokens.weight"
LM_HEAD = LLM + "lm_head.weight"
LORA = LLM + "model.layers.{i}.self_attn.{proj}_proj.lora_{ab}.default.weight"
PROJ_WEIGHT, PROJ_BIAS = "llama_proj.weight", "llama_proj.bias"
FUSION = "preencoding.layers.{i}."
ADDED_TOKENS = len(tokenizer.ADDED_TOKENS)  # <Img>, </Img> and the four set-literal strings the original added
IMAGEBIND_HEADS = ("modality_heads.audio.2.weight", "modality_heads.vision.2.weight")


@dataclass(frozen=True)
class BaseShape:
    """What the delta must agree with: the base LLM's size and the vocabulary it had before the added tokens."""

    hidden: int
    layers: int
    vocabs: frozenset[int]  # the tokenizer's length (the original resizes to it), and config.vocab_size


def imagebind_problems(shapes: Shapes) -> list[str]:
    missing = [k for k in IMAGEBIND_HEADS if k not in shapes]
    return [f"not an ImageBind state dict (no {', '.join(missing)})"] if missing else []


def imagebind_dim(shapes: Shapes) -> int:
    return shapes[IMAGEBIND_HEADS[0]][0]


def delta_problems(shapes: Shapes, variant: str, base: BaseShape | None, encoder_dim: int | None) -> list[str]:
    """Everything wrong with a delta's keys and shapes (empty when it fits the base and the encoder)."""
    if PROJ_WEIGHT not in shapes or len(shapes[PROJ_WEIGHT]) != 2:
        return [f"no 2-D {PROJ_WEIGHT}: not a DeepResonance delta"]
    hidden, enc = shapes[PROJ_WEIGHT]
    problems = []
    if base is not None and hidden != base.hidden:
        problems.append(f"{PROJ_WEIGHT} has hidden {hidden}, the base LLM {base.hidden}")
    if encoder_dim is not None and enc != encoder_dim:
        problems.append(f"{PROJ_WEIGHT} takes {enc}-dim features, ImageBind gives {encoder_dim}")
    problems += _want(shapes, PROJ_BIAS, (hidden,))
    problems += _vocab_problems(shapes, hidden, base)
    layers = base.layers if base is not None else _count_layers(shapes, LLM + "model.layers.")
    problems += _lora_problems(shapes, hidden, layers)
    fusion_layers = _count_layers(shapes, "preencoding.layers.")
    if variant == "alpha" and fusion_layers:
        problems.append("holds beta's preencoding weights: is this the beta delta?")
    if variant == "beta":
        problems += _fusion_problems(shapes, hidden, fusion_layers)
    return problems


def _want(shapes: Shapes, key: str, shape: tuple[int, ...]) -> list[str]:
    if key not in shapes:
        return [f"missing {key}"]
    return [] if shapes[key] == shape else [f"{key} is {shapes[key]}, expected {shape}"]


def _count_layers(shapes: Shapes, prefix: str) -> int:
    layer = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in shapes if (m := layer.match(k))]
    return max(found) + 1 if found else 0


def _vocab_problems(shapes: Shapes, hidden: int, base: BaseShape | None) -> list[str]:
    if EMBED not in shapes:
        return [f"missing {EMBED}"]
    rows = shapes[EMBED][0]
    problems = _want(shapes, EMBED, (rows, hidden)) + _want(shapes, LM_HEAD, (rows, hidden))
    if base is not None and rows - ADDED_TOKENS not in base.vocabs:
        wanted = " or ".join(str(v + ADDED_TOKENS) for v in sorted(base.vocabs))
        problems.append(f"vocabulary of {rows} rows, expected {wanted} (base vocabulary + {ADDED_TOKENS})")
    return problems


def _lora_problems(shapes: Shapes, hidden: int, layers: int) -> list[str]:
    first = LORA.format(i=0, proj="q", ab="A")
    if first not in shapes:
        return [f"missing {first}"]
    rank = shapes[first][0]
    problems: list[str] = []
    for i in range(layers):
        for proj in "qkvo":
            problems += _want(shapes, LORA.format(i=i, proj=proj, ab="A"), (rank, hidden))
            problems += _want(shapes, LORA.format(i=i, proj=proj, ab="B"), (hidden, rank))
    return problems[:6]


def _fusion_problems(shapes: Shapes, hidden: int, layers: int) -> list[str]:
    if not layers:
        return [f"missing {FUSION.format(i=0)}*: beta needs its fusion layer"]
    ff_key = FUSION.format(i=0) + "linear1.weight"
    ff = shapes.get(ff_key, (0,))[0]
    problems: list[str] = []
    for i in range(layers):
        p = FUSION.format(i=i)
        problems += _want(shapes, p + "self_attn.in_proj_weight", (3 * hidden, hidden))
        problems += _want(shapes, p + "self_attn.in_proj_bias", (3 * hidden,))
        problems += _want(shapes, p + "self_attn.out_proj.weight", (hidden, hidden))
        problems += _want(shapes, p + "self_attn.out_proj.bias", (hidden,))
        problems += _want(shapes, p + "linear1.weight", (ff, hidden))
        problems += _want(shapes, p + "linear1.bias", (ff,))
        problems += _want(shapes, p + "linear2.weight", (hidden, ff))
        problems += _want(shapes, p + "linear2.bias", (hidden,))
        for norm in ("norm1", "norm2"):
            problems += _want(shapes, p + norm + ".weight", (hidden,))
            problems += _want(shapes, p + norm + ".bias", (hidden,))
    return problems[:6]
