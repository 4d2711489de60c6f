"""`dr ckpt export`: a standalone folder with LoRA merged, loadable without the base + delta pair."""

from __future__ import annotations

from pathlib import Path

import torch

from ckpt.layout import layout
from model.config import Variant
from model.network.checkpoint import export_model, load_model


def export(
    root: str | Path,
    variant: Variant,
    out: str | Path,
    base: str | Path | None = None,
    delta: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Merges the delta's LoRA into Vicuna and writes it with the projector/fusion and the ImageBind reference."""
    paths = layout(root)
    model = load_model(base or paths.vicuna, delta or paths.delta_dir(variant), None, variant, dtype=dtype)
    return export_model(model, out, paths.imagebind)
