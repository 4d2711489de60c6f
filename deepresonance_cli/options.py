"""Options shared by several commands (`dr infer`, `dr ask`, `dr train`, `dr data check`), checked when the command
line is parsed: a typo is one usage line, never a KeyError or a trace from deep inside torch."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

AllowOutside = Annotated[
    bool,
    typer.Option(
        help="Read media paths that leave the media root (absolute, or '..' above it), as the original did; without "
        "it their rows are refused, one line each, and the other rows go on.",
    ),
]


class VariantChoice(str, Enum):
    alpha = "alpha"
    beta = "beta"


class DtypeChoice(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TrainDtypeChoice(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


def check_device(device: str | None) -> str | None:
    """cpu, cuda or cuda:N that exists here (a typer callback: a bad one is a usage error naming --device)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise typer.BadParameter(f"{device!r} is not a device (cpu, cuda, cuda:1)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{device!r}: dr runs on cpu or cuda")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(f"{device!r}: no CUDA GPU is visible here (use --device cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise typer.BadParameter(f"{device!r}: only {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    return device
