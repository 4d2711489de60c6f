"""Weights read onto a GPU by threads of their own, begun before the process imports transformers: a second `dr
infer` process spent about 6 s importing and then 3.7-4.1 s copying the 13.5 GB of LLaMA weights to an H100 from their
mapped files beside ImageBind's load (benchmarks/results/2026-12-08-h100-stored-and-load/), one after the other.
Reading files with `preadv`, and copying mapped tensors to the card, release the interpreter's lock, so the imports
go on beside them (on this project's CPU a 2.2 GB read finished inside the imports, which took 3.8-4.2 s beside it
against 3.7-5.2 s alone). A source is a Hugging Face folder's safetensors (the LLaMA) or a torch pickle (ImageBind's
`.pth`); each load takes the read of the source it reads (`early_for`).

The read is an optimisation only: where it fails (a damaged header, a short file, a dtype it does not know), `take`
gives None and the ordinary load reads the source and reports what is wrong, in its own words.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from model.io import transfer
from model.io.files import file_identity
from model.io.weights import INDEX_FILES, SINGLE_FILES

# the two files transformers looks for first, in its order (a folder with only .bin shards is not read early)
SAFE_SINGLE, SAFE_INDEX = SINGLE_FILES[0], INDEX_FILES[0]
# the format's dtype names (safetensors' specification)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK = 32 << 20  # bytes a read brings into a pinned buffer, and a copy takes to the card, at once
HEADER_LIMIT = 100 << 20  # safetensors' own bound on a header's length

log = logging.getLogger(__name__)


class ReadFailed(Exception):
    pass


@dataclass(frozen=True)
class Span:
    """One tensor's bytes in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def safetensors_spans(path: Path) -> list[Span]:
    """Where each tensor of a safetensors file lies: an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}} and the data after it. Written here because safetensors' API gives tensors
    from a mapping, not their offsets, and a mapping is what made the copy slow. Raises ReadFailed where the header
    does not fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ReadFailed(f"{path}: shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(HEADER_LIMIT, size - 8):
            raise ReadFailed(f"{path}: header of {length} bytes does not fit the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReadFailed(f"{path}: header is not JSON") from err
    if not isinstance(header, dict):
        raise ReadFailed(f"{path}: header is not a dict")
    base = 8 + length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            start, end = (base + int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ReadFailed(f"{path}: entry {name!r} is not a tensor this reader knows") from err
        if start < base or end > size or end - start != math.prod(shape) * dtype.itemsize or min(shape, default=0) < 0:
            raise ReadFailed(f"{path}: tensor {name!r} does not fit its place in the file")
        spans.append(Span(name, dtype, shape, start, end))
    return spans


def safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers' `from_pretrained` reads from `folder` (`model.safetensors`, else the
    index's shards), or None where it would read something else."""
    if (folder / SAFE_SINGLE).is_file():
        return [folder / SAFE_SINGLE]
    if (folder / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
            return [folder / name for name in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return None


class EarlyRead:
    """Reads `source` onto `device` from construction, with `threads` threads (None: COPY_THREADS, as the loader's
    copies), each floating tensor converted to `dtype` as it arrives (None: the file's) so that the card never holds
    a checkpoint's float16 and the model's bfloat16 whole at once, as a conversion after the read would (27 GB for
    Vicuna-7B). `take` waits for them: {name: tensor in its file's shape}, or None where the read failed (`failed`
    says why) or was closed.

    A folder's safetensors are read by bytes: each thread fills the card through two pinned buffers on a stream of
    its own, a buffer read while the other's copy runs (on a CPU, straight into the tensors). A torch pickle is
    mapped as the load maps it, and the tensors `keep` names (None: all) are copied out by `transfer.placed`, the
    load's own op; the others stay mapped, for the load to check and drop. `identity`: the file's before the read,
    for a load that records which file its weights came from."""

    def __init__(
        self,
        source: Path,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        threads: int | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        self.source = Path(source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.keep = keep
        self.failed: str | None = None
        self.identity: dict[str, str | int] | None = None
        self._stop = threading.Event()
        self._state: dict[str, torch.Tensor] | None = None
        count = threads or transfer.COPY_THREADS
        self._thread = threading.Thread(target=self._read, args=(count,), name="dr-early-read")
        self._thread.start()

    def take(self) -> dict[str, torch.Tensor] | None:
        """The weights read (once: the read's own references are dropped, so the model holds the only ones)."""
        self._thread.join()
        state, self._state = self._state, None
        if state is None and self.failed not in (None, "closed"):
            log.info("%s: not read early (%s); the load reads it", self.source, self.failed)
        return state

    def close(self) -> None:
        """Stop reading, at the next chunk or tensor, and drop what was read."""
        self._stop.set()
        self._thread.join()
        self._state = None

    def _read(self, threads: int) -> None:
        try:
            state = self._read_folder(threads) if self.source.is_dir() else self._read_pickle(threads)
            if self._stop.is_set():
                raise ReadFailed("closed")
            self._state = state
        except Exception as err:  # any failure leaves the load to the ordinary path, which names what is wrong
            self.failed = str(err) if isinstance(err, ReadFailed) else f"{type(err).__name__}: {err}"

    def _read_folder(self, threads: int) -> dict[str, torch.Tensor]:
        files = safetensors_files(self.source)
        if files is None:
            raise ReadFailed(f"{self.source}: no safetensors weights")
        spans = [(path, span) for path in files for span in safetensors_spans(path)]
        if not spans:
            raise ReadFailed(f"{self.source}: no tensors in its safetensors files")
        shares = split_by_bytes(spans, threads)
        with ThreadPoolExecutor(len(shares)) as pool:
            return {name: t for part in pool.map(self._read_share, shares) for name, t in part.items()}

    def _read_pickle(self, threads: int) -> dict[str, torch.Tensor]:
        self.identity = file_identity(self.source)
        state = torch.load(self.source, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ReadFailed(f"{self.source}: not a dict of tensors")
        names = [name for name in state if self.keep is None or self.keep(name)]

        def copy(name: str) -> torch.Tensor | None:
            return None if self._stop.is_set() else transfer.placed(state[name], self.device, self.dtype)

        with ThreadPoolExecutor(threads) as pool:
            for name, tensor in zip(names, pool.map(copy, names), strict=True):
                state[name] = tensor
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies whole before the load sees them
        return state

    def _read_share(self, share: list[tuple[Path, Span]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        copier = CardCopier(self.device) if self.device.type == "cuda" else None
        descriptors: dict[Path, int] = {}
        try:
            for path, span in share:
                if self._stop.is_set():
                    break
                if path not in descriptors:
                    descriptors[path] = os.open(path, os.O_RDONLY)
                raw = torch.empty(span.end - span.start, dtype=torch.uint8, device=self.device)
                if copier is not None:
                    copier.fill(raw, descriptors[path], span.start, self._stop)
                else:
                    read_into(descriptors[path], memoryview(raw.numpy()), span.start)
                tensor = raw.view(span.dtype).view(span.shape)
                if self.dtype is not None and span.dtype.is_floating_point and span.dtype != self.dtype:
                    converted = torch.empty(span.shape, dtype=self.dtype, device=self.device)
                    if copier is not None:
                        copier.convert(tensor, converted)
                    else:
                        converted.copy_(tensor)
                    tensor = converted
                out[span.name] = tensor
        finally:
            if copier is not None:
                copier.finish()  # also where a read failed: no copy may still be writing a tensor that is let go
            for fd in descriptors.values():
                os.close(fd)
        return out


def early_for(
    reads: Sequence[EarlyRead], source: Path, device: torch.device | str, dtype: torch.dtype | None
) -> EarlyRead | None:
    """The read of `source` onto `device` in `dtype` among `reads`, for the load that reads it (None: that load reads
    the file itself: a read in another dtype would have rounded what the load converts from the file)."""
    wanted = (Path(source), torch.device(device), dtype)
    return next((r for r in reads if (r.source, r.device, r.dtype) == wanted), None)


def split_by_bytes(spans: list[tuple[Path, Span]], parts: int) -> list[list[tuple[Path, Span]]]:
    """`spans` in `parts` lists of near-equal bytes (largest first, each to the lightest list), each list in file
    order so that its reads go forward through the files."""
    shares: list[list[tuple[Path, Span]]] = [[] for _ in range(max(1, min(parts, len(spans))))]
    loads = [0] * len(shares)
    for item in sorted(spans, key=lambda s: s[1].end - s[1].start, reverse=True):
        lightest = loads.index(min(loads))
        shares[lightest].append(item)
        loads[lightest] += item[1].end - item[1].start
    order = {id(item): i for i, item in enumerate(spans)}
    return [sorted(share, key=lambda s: order[id(s)]) for share in shares if share]


def read_into(fd: int, target: memoryview, offset: int) -> None:
    """`len(target)` bytes of the file from `offset`; a file that ends first raises ReadFailed."""
    done = 0
    while done < len(target):
        n = os.preadv(fd, [target[done:]], offset + done)
        if n == 0:
            raise ReadFailed(f"file ends before byte {offset + len(target)}")
        done += n


class CardCopier:
    """Bytes of a file onto a GPU tensor in CHUNK pieces, through two pinned buffers: the next piece is read while the
    last one's copy runs on this copier's stream. The tensors it fills are allocated on the default stream (the
    model's); `finish` waits for the copies, so they are whole before anyone else sees them."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.views = [memoryview(b.numpy()) for b in self.buffers]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def fill(self, raw: torch.Tensor, fd: int, offset: int, stop: threading.Event) -> None:
        for at in range(0, raw.numel(), CHUNK):
            if stop.is_set():
                return
            n = min(CHUNK, raw.numel() - at)
            turn, self.turn = self.turn, 1 - self.turn
            if self.copied[turn] is not None:
                self.copied[turn].synchronize()  # this buffer's last copy is done: it may be read into again
            read_into(fd, self.views[turn][:n], offset + at)
            with torch.cuda.stream(self.stream):
                raw[at : at + n].copy_(self.buffers[turn][:n], non_blocking=True)
                self.copied[turn] = torch.cuda.Event()
                self.copied[turn].record(self.stream)

    def convert(self, tensor: torch.Tensor, into: torch.Tensor) -> None:
        """`into` (allocated on the default stream) takes `tensor` in its dtype, after the copies that filled it;
        `tensor`'s memory is not handed out again until the conversion has read it."""
        with torch.cuda.stream(self.stream):
            into.copy_(tensor)
        tensor.record_stream(self.stream)

    def finish(self) -> None:
        self.stream.synchronize()
