"""Per-dataset inference that never loses finished work.

Answers are appended to a JSONL journal as each batch finishes (flushed and fsync'd), so a killed job loses at most
the batch in flight; a rerun skips every (id, instruction) already answered. The original's result layout
`{id: {instruction: answer}}` is rebuilt from the journal(s). Rows are sorted by prompt length so batches pad little,
media go through the feature cache, and a row whose media is missing or unreadable is reported and skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from model.config import GenerationConfig
from model.data import Row, media_path
from model.decode import cache_bytes, padded_shape
from model.deepresonance import DeepResonance, Example
from model.features import FeatureCache, encode_files
from model.generate import generate
from model.journal import open_journal, output_lock, run_identity
from model.media import MediaError

log = logging.getLogger(__name__)
DECODE_WORKERS = min(8, os.cpu_count() or 1)  # media decoding threads (numpy/torchaudio release the GIL)
# Decode steps (batches x max_new_tokens) from which the static loop repays its one-time compile: on an H100 the
# compile takes about 60 s and the loop saves 11-14 ms per step at batch 1-512 (benchmarks/README.md).
STATIC_MIN_STEPS = 6000
MAX_PROMPT = 256  # positions assumed for a prompt when sizing the static cache before any batch is built


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  # answered by an earlier run
    answered: int = 0
    failed: list[str] = field(default_factory=list)  # one `id: reason` line per row that could not be answered


def prompt_cost(row: Row) -> int:
    """A cheap proxy for prompt length, to sort rows so that batches pad little."""
    clips = {"audio": 3, "image": 1, "video": 15}
    return len(row.input) + len(row.instruction) + 4 * sum(clips[m] for m in row.mm_names)


def row_media(
    model: DeepResonance,
    rows: Sequence[Row],
    media_root: Path,
    cache: FeatureCache | None,
    batch_size: int,
    workers: int = DECODE_WORKERS,
) -> list[list[tuple[str, torch.Tensor]] | MediaError]:
    """Each row's media as clip features (through the cache) or the row's first media error."""
    if model.visual_encoder is None:
        raise ValueError("inference needs the ImageBind encoder: load the model with its imagebind weights")
    wanted: dict[str, list[Path]] = {}
    for row in rows:
        for i, modality in enumerate(row.mm_names):
            wanted.setdefault(modality, []).append(media_path(row, i, media_root))
    features: dict[tuple[str, Path], torch.Tensor | MediaError] = {}
    for modality, paths in wanted.items():
        unique = list(dict.fromkeys(paths))
        encoded = encode_files(model.visual_encoder, cache, modality, unique, batch_size, workers)
        features.update({(modality, p): f for p, f in zip(unique, encoded, strict=True)})
    out: list[list[tuple[str, torch.Tensor]] | MediaError] = []
    for row in rows:
        items = [(m, features[(m, media_path(row, i, media_root))]) for i, m in enumerate(row.mm_names)]
        error = next((f for _, f in items if isinstance(f, MediaError)), None)
        out.append(error if error is not None else items)
    return out


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prefetched(groups: Sequence[Sequence[Row]], load: Callable[[Sequence[Row]], list]) -> Iterator[tuple]:
    """(group, load(group)) for each group, the next group loading in a background thread while the caller works."""
    if not groups:
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, groups[0])
        try:
            for k, group in enumerate(groups):
                loaded = pending.result()
                if k + 1 < len(groups):
                    pending = pool.submit(load, groups[k + 1])
                yield group, loaded
        finally:
            pending.cancel()


def choose_static_cache(model: DeepResonance, rows: int, batch_size: int, gen: GenerationConfig) -> bool:
    """`gen.static_cache` if set; else (auto) the static loop on CUDA for jobs long enough to repay its compile,
    when its cache fits in half the free GPU memory."""
    if gen.static_cache is not None:
        return gen.static_cache
    device = model.llama_model.device
    if device.type != "cuda" or -(-rows // batch_size) * gen.max_new_tokens < STATIC_MIN_STEPS:
        return False
    batch, total = padded_shape(min(rows, batch_size), MAX_PROMPT, gen.max_new_tokens)
    need = cache_bytes(model.llama_model.config, batch, total, model.llama_model.dtype)
    return need <= torch.cuda.mem_get_info(device)[0] // 2


def run_inference(
    model: DeepResonance,
    rows: Sequence[Row],
    media_root: str | Path,
    out_json: str | Path,
    gen: GenerationConfig,
    batch_size: int = 8,
    cache: FeatureCache | None = None,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int], None] | None = None,
    workers: int = DECODE_WORKERS,
    overwrite: bool = False,
) -> Summary:
    """Answers every row not answered yet; `on_progress(n)` is called as n more rows finish.

    One process per `out_json` (its lock is held throughout); answers of another delta, variant, dtype or generation
    settings already in its journal are a JournalError unless `overwrite` (which answers every row again).
    """
    out_json, media_root = Path(out_json), Path(media_root)
    lock = output_lock(out_json, rank).acquire()  # re-entrant: `dr infer` took it before loading the model
    try:
        journal, done = open_journal(out_json, run_identity(model, gen), overwrite=overwrite, rank=rank, world=world)
    except BaseException:
        lock.release()
        raise
    todo = [r for r in rows if (r.id, r.instruction) not in done][rank::world]
    summary = Summary(total=len(rows), skipped=sum((r.id, r.instruction) in done for r in rows))
    todo.sort(key=prompt_cost)
    if todo:
        gen = replace(gen, static_cache=choose_static_cache(model, len(todo), batch_size, gen))
        log.info(
            "decoding with %s",
            "the static-cache loop (compiled on the first batch)" if gen.static_cache else "generate",
        )
    # media a batch at a time (the encoder runs batched, the cache keeps what it computed): the next batch's media are
    # read, preprocessed and encoded in a background thread while this batch's answers decode
    batches = list(chunks(todo, batch_size))
    try:
        for group, media in prefetched(batches, lambda g: row_media(model, g, media_root, cache, batch_size, workers)):
            ready = [(row, m) for row, m in zip(group, media, strict=True) if not isinstance(m, MediaError)]
            failed = [(row, m) for row, m in zip(group, media, strict=True) if isinstance(m, MediaError)]
            journal.write([{"id": r.id, "instruction": r.instruction, "error": str(e)} for r, e in failed])
            summary.failed.extend(f"{r.id}: {e}" for r, e in failed)
            if on_progress and failed:
                on_progress(len(failed))
            if not ready:
                continue
            answers = generate(model, [Example(r.input, r.instruction, m) for r, m in ready], gen)
            finished = zip(ready, answers, strict=True)
            journal.write([{"id": r.id, "instruction": r.instruction, "answer": a} for (r, _), a in finished])
            summary.answered += len(ready)
            if on_progress:
                on_progress(len(ready))
    finally:
        journal.close()
        lock.release()
    return summary
