"""Lazy access to weight files: Hugging Face folders (sharded safetensors or .bin), the delta, ImageBind.

Checkpoints here are 4-14 GB, so nothing loads a whole model: safetensors are read one tensor at a time, pickled
shards are memory-mapped one shard at a time, and pickles are only ever opened with `weights_only=True`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ckpt.files import CkptError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A torch pickle as a dict of tensors, memory-mapped and without code execution."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file: the caller reports it as corrupt
        raise CkptError(f"{path} does not load as a weights-only torch file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CkptError(f"{path} is not a flat dict of tensors")
    return state


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one weights file (.safetensors header only; pickles memory-mapped)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise CkptError(f"{path} is not a readable safetensors file ({e})") from e
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


def write_safetensors(
    path: Path, specs: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype, tensors: Iterator[torch.Tensor]
) -> None:
    """Write a safetensors file tensor by tensor, so memory holds one tensor, not the whole shard.

    The header is known up front from the planned shapes; `tensors` must yield them in `specs` order.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    order = []
    for name, shape in specs:
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        order.append((name, shape))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in order:
            tensor = next(tensors)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise CkptError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor  # before the next one is made
