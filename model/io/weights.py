"""Lazy access to weight files: Hugging Face folders (sharded safetensors or .bin), the delta, ImageBind.

Checkpoints here are 4-14 GB, so nothing loads a whole model: safetensors are read one tensor at a time, pickled
shards are memory-mapped one shard at a time, and pickles are only ever opened with `weights_only=True`.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from model.io.errors import CkptError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def torch_load(path: Path) -> object:
    """`torch.load` with `weights_only=True` (never runs code), memory-mapped when the file allows it (the zip format;
    older pickles load whole), with every failure one CkptError line naming the file.

    torch's own refusal of a code payload is 12 lines advising `weights_only=False`; here it says what it means.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError as e:
        raise CkptError(f"{path}: no such file") from e
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported class" in str(e):  # a callable or class the file wants imported
            raise CkptError(
                f"{path}: holds code or Python objects, not only tensors, and was not loaded (dr never runs code "
                "from a weights file); get a clean copy, or convert it where you trust it"
            ) from e
        detail = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's text advises weights_only=False; keep only its diagnosis (e.g. "Unsupported operand 110")
        reason = next((line for line in reversed(detail) if line.startswith("Unsupported")), "not a torch pickle")
        raise CkptError(f"{path}: damaged or not a torch file ({reason})") from e
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as e:  # truncated, empty, foreign bytes
        reason = "empty file" if path.stat().st_size == 0 else f"{type(e).__name__}: {_first_line(e)}"
        raise CkptError(f"{path}: truncated or damaged torch file ({reason})") from e


def _first_line(err: BaseException) -> str:
    """The diagnosis, without the advice libraries append (the first sentence of the first line)."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line.split(". ", 1)[0][:200]


def tensor_dict(state: object, path: Path) -> dict[str, torch.Tensor]:
    """A loaded weights file must be a flat {name: tensor} dict; anything else is named, not an AttributeError."""
    if not isinstance(state, dict):
        raise CkptError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CkptError(f"{path}: entry {bad[0]!r} is a {type(bad[1]).__name__}, not a tensor")
    return state


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A torch pickle as a dict of tensors, memory-mapped and without code execution."""
    return tensor_dict(torch_load(path), path)


def safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """A whole safetensors file; a damaged header or a cut file is one CkptError line naming it."""
    try:
        return load_file(str(path))
    except FileNotFoundError as e:
        raise CkptError(f"{path}: no such file") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise CkptError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file, from its header only, whatever the file is called."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CkptError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one weights file (.safetensors header only; pickles memory-mapped)."""
    if path.suffix == ".safetensors":
        return safetensors_shapes(path)
    return {k: tuple(v.shape) for k, v in load_pickle(path).items()}


class ShardedWeights:
    """The tensors of a Hugging Face model folder, by name, read lazily (one pickled shard mapped at a time)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.weight_map = _weight_map(folder)
        missing = sorted({f for f in self.weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CkptError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        self._bin: tuple[str, dict[str, torch.Tensor]] | None = None

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, file by file, in the files' order."""
        out: dict[str, tuple[int, ...]] = {}
        for file in self.files:
            out |= tensor_shapes(self.folder / file)
            self._bin = None
        return out

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        path = self.folder / file
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        if self._bin is None or self._bin[0] != file:
            self._bin = None  # drop the previous shard before mapping the next
            self._bin = (file, load_pickle(path))
        return self._bin[1][name]

    def release(self) -> None:
        """Unmap the cached pickled shard."""
        self._bin = None


def _weight_map(folder: Path) -> dict[str, str]:
    for index in INDEX_FILES:
        if (folder / index).is_file():
            return json.loads((folder / index).read_text())["weight_map"]
    for single in SINGLE_FILES:
        if (folder / single).is_file():
            return dict.fromkeys(tensor_shapes(folder / single), single)
    raise CkptError(f"{folder}: no weights (expected one of {', '.join(INDEX_FILES + SINGLE_FILES)})")
