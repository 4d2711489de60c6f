"""What an exported folder holds, and which folder a load reads the LLaMA weights from: importable without
transformers, so a process can begin reading those weights (model/io/early_read.py) before it imports the model."""

from __future__ import annotations

from pathlib import Path

EXPORT_INFO = "dr_export.json"
EXPORT_LLM = "llm"
EXPORT_MM = "mm.safetensors"


def exported(delta: str | Path | None) -> bool:
    """Whether `delta` is a folder `export_model` wrote (loaded standalone, without the base folder)."""
    return delta is not None and (Path(delta) / EXPORT_INFO).is_file()


def llm_folder(base: str | Path, delta: str | Path | None) -> Path:
    """The Hugging Face folder `load_model` reads the LLaMA from: an export's own, else the base."""
    return Path(delta) / EXPORT_LLM if exported(delta) else Path(base)
