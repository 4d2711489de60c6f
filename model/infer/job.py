"""Per-dataset inference that never loses finished work.

Rows decode through the continuous-batching engine (model/engine/scheduler.py) and finish out of order; the rows that
end together are appended to a JSONL journal (model/infer/journal.py: flushed and fsync'd), so a killed job loses at
most the rows in flight, and a rerun skips every (id, instruction) already answered. The original's result layout
`{id: {instruction: answer}}` is rebuilt from the journal(s). Rows are sorted by prompt length so prefills pad
little, media go through the feature cache, and a row whose media is missing or unreadable is reported and skipped.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import GenerationConfig
from model.data.catalog import Row, media_files
from model.data.row_features import DECODE_WORKERS, DecodedMedia, decode_media, encode_media
from model.engine.compile_cache import trace_once
from model.engine.model_runner import job_compiles_prefill
from model.engine.sampler import row_key
from model.engine.scheduler import WAIT, Engine
from model.engine.sequence import Request
from model.generate.base import generate
from model.infer.journal import Journal, open_journal, output_lock, run_identity
from model.infer.kept_engine import KeptEngine, job_engine
from model.io.stop_signal import StopOnSignal
from model.media.decoders import DecodeProcesses, start_decoders
from model.media.feature_stores import ProcessStores
from model.media.features import FeatureCache
from model.media.preprocess import MediaError
from model.network.deepresonance import DeepResonance, Example

log = logging.getLogger(__name__)


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  # answered by an earlier run
    answered: int = 0
    failed: list[str] = field(default_factory=list)  # one `id: reason` line per row that could not be answered


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# media groups loaded ahead of the engine: a group's features are small (a 512-row audio group about 6 MB), so the
# loader runs ahead of the decoding instead of idling while the engine takes the groups before it
PREFETCH_DEPTH = 6
# groups a stage of the loader may run ahead of the next: a group's decoded inputs (the large ones: 160 MB for 512
# ten-second wavs in float32, half that in a GPU job's bfloat16) wait for the encoder while the next group decodes,
# and no more
HANDOFF = 2
# rows in an engine job's first media group: its media (decoded on the loader's thread while the decoding processes
# start, model/media/decoders.py) are ready in about half a second, so the engine starts on them as soon as it is
# built instead of waiting for a whole engine-full of media; the step's narrow width (model/engine/scheduler.py)
FIRST_GROUP = 64
# the CUDA priority of the loader's stream (0: the engine's default stream's; lower is higher). Neither way helped a
# catalog-shaped job on an H100: the engine's stream above the loader's moved the last media 1-1.3 s later
# (benchmarks/results/2026-12-07-h100-job-order-block32/), the loader's above the engine's left the job 0.5 s slower,
# its encoder calls no shorter (medians of three and two runs, benchmarks/results/2026-12-07-h100-next/)
LOADER_PRIORITY = 0
Gate = threading.Semaphore | None


class Prefetch:
    """(group, result) for each group, in order, where result is the group passed through `stages` in turn
    (stages[-1](...stages[0](group))), each stage on a background thread of its own that takes the groups in order:
    while one stage works on a group, the one before it works on the next (decoding the next group's media while
    this group's are encoded). A stage runs at most HANDOFF groups ahead of the next, and the last at most `depth`
    ahead of the caller. The first loads start at construction, so they overlap whatever the caller does before it
    iterates (building and compiling the engine). While `busy()` says the caller has other work, a group not loaded
    yet comes back as WAIT instead of being waited for."""

    def __init__(self, groups: Sequence, *stages: Callable, depth: int = PREFETCH_DEPTH):
        self.groups, self.stages = groups, stages
        self.threads = [ThreadPoolExecutor(1, thread_name_prefix=f"dr-media-{i}") for i in range(len(stages))]
        self.gates = [threading.Semaphore(HANDOFF) for _ in stages[1:]]
        self.closed = False
        self.pending = deque(self._submit(g) for g in groups[:depth])
        self.busy: Callable[[], bool] = lambda: False

    def _submit(self, group: object) -> Future:
        """The group's last stage's future; stage i takes gates[i] before it starts and stage i + 1 gives it back."""
        given: object = group
        for i, (stage, thread) in enumerate(zip(self.stages, self.threads, strict=True)):
            enter = self.gates[i] if i < len(self.gates) else None
            leave = self.gates[i - 1] if i > 0 else None
            given = thread.submit(self._run, stage, given, i > 0, enter, leave)
        return given  # type: ignore[return-value]

    def _run(self, stage: Callable, given: object, chained: bool, enter: Gate, leave: Gate) -> object:
        try:
            if enter is not None and not self.closed:
                enter.acquire()
            if self.closed:
                raise CancelledError
            return stage(given.result() if chained else given)  # type: ignore[attr-defined]
        finally:
            if leave is not None:
                leave.release()

    def __iter__(self) -> Iterator[tuple[Sequence, object] | object]:
        upcoming = len(self.pending)
        for group in self.groups:
            while self.busy() and not self.pending[0].done():
                yield WAIT
            loaded = self.pending.popleft().result()
            if upcoming < len(self.groups):
                self.pending.append(self._submit(self.groups[upcoming]))
                upcoming += 1
            yield group, loaded

    def close(self) -> None:
        self.closed = True
        for gate in self.gates:  # a stage waiting for its gate goes on, and sees `closed`
            gate.release()
        for thread in self.threads:
            thread.shutdown(wait=True, cancel_futures=True)


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
    on_total: Callable[[int], None] | None = None,
    overwrite: bool = False,
    decoders: DecodeProcesses | None = None,
    kept: KeptEngine | None = None,
) -> Summary:
    """Answers every row not answered yet; `on_total(n)` is told how many rows this process will answer, then
    `on_progress(n)` is called as n more rows finish. `batch_size` is the engine's slot count (rows decoding
    together) or, for the static decoders, the rows per batch. `decoders`: decoding processes the caller started
    (model/media/decoders.py `start_decoders`) and closes; without them, a long job on a GPU starts its own. `kept`:
    where the caller keeps an engine between its jobs (model/infer/kept_engine.py), reused by a job of its shape.

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
    try:
        todo = [r for r in rows if (r.id, r.instruction) not in done][rank::world]
        summary = Summary(total=len(rows), skipped=sum((r.id, r.instruction) in done for r in rows))
        if on_total:
            on_total(len(todo))
        if todo:
            answer_rows(
                model, todo, media_root, gen, batch_size, cache, workers, decoders, journal, summary, on_progress, kept
            )
    finally:
        if cache is not None:
            cache.hashes.save()  # what the lookups' last saves left (model/media/file_hashes.py, SAVE_EVERY_S)
        journal.close()
        lock.release()
    return summary


def answer_rows(
    model: DeepResonance,
    todo: list[Row],
    media_root: Path,
    gen: GenerationConfig,
    batch_size: int,
    cache: FeatureCache | None,
    workers: int,
    decoders: DecodeProcesses | None,
    journal: Journal,
    summary: Summary,
    on_progress: Callable[[int], None] | None,
    kept: KeptEngine | None = None,
) -> None:
    """Answers `todo`, journaling rows as they finish (answers and media errors) and counting them in `summary`."""
    lengths = {id(r): model.prompt_length(r.input, r.instruction, [model.clips(m) for m in r.mm_names]) for r in todo}
    todo.sort(key=lambda r: lengths[id(r)])  # the static decoders pad a batch to its longest (the engine packs)
    # media a batch at a time (the encoder runs batched, the cache keeps what it computed), read, preprocessed (in
    # processes for a long job on a GPU: model/media/decoders.py) and encoded by background threads (Prefetch) that
    # start while the engine is built, and stay PREFETCH_DEPTH batches ahead of the decoding
    first = min(FIRST_GROUP, batch_size) if gen.decoder == "engine" else batch_size  # a static decoder's: batches
    batches = [todo[:first], *chunks(todo[first:], batch_size)]
    # an engine is sized now, before the loader allocates encoder activations: its cache's pool is a share of the
    # free memory, and a pool size that followed the loader's progress would differ from run to run, and so would the
    # compiled step's shapes, which the compile cache of an earlier job would then not hold (model/engine/sizing.py);
    # or the engine `kept` from the caller's last job, where it has this job's shape
    if gen.decoder == "engine":
        compile_prefill = job_compiles_prefill(sum(lengths.values()))
        engine = job_engine(model, max(lengths.values()), gen, batch_size, compile_prefill, kept)
    else:
        engine = None
    # the loader's copies and encoder calls go on a CUDA stream of their own: on the default stream, shared by every
    # thread, they would queue between the engine's decode steps (the steps waiting for a whole group's encoding) and
    # each call's read-back would wait for every step queued before it
    side = torch.cuda.Stream(model.device, priority=LOADER_PRIORITY) if model.device.type == "cuda" else None

    stop = StopOnSignal((signal.SIGINT,))
    with ExitStack() as closing:
        if decoders is None:  # none started by the caller
            decoders = start_decoders(media_files(todo), model.device)
            if decoders is not None:
                closing.callback(decoders.close)
        # the feature files are written by the decoding processes too, where there are some
        # (model/media/feature_stores.py)
        stores = ProcessStores(decoders) if decoders is not None else None

        def decode(group: Sequence[Row]) -> DecodedMedia:
            return decode_media(model, group, media_root, cache, workers, decoders)

        def encode(media: DecodedMedia) -> list:
            with torch.cuda.stream(side):  # no-op without one
                return encode_media(model, media, cache, batch_size, workers, stores)

        # a group decodes while the one before it is encoded and stored: on one thread, the decoding processes
        # idled through the encoding and the stores (musiccaps on an H100: 11.1 s of decoding in a 17.4 s media
        # wall, benchmarks/results/2026-12-06-h100-pipeline-measured/)
        if model.device.type == "cuda":  # the engine (or static loop) compiles there beside the loader's encoder
            trace_once()
        media = Prefetch(batches, decode, encode)
        closing.callback(media.close)
        closing.enter_context(stop)
        decode_rows(model, engine, gen, media, journal, summary, stop, on_progress)
        if stores is not None:
            # every feature file written before the job returns and its pool closes (closing cancels what is still
            # queued), a failed write failing the job; after an error or a Ctrl-C the queued ones are dropped (an
            # entry is whole or absent: the next job encodes it again)
            stores.wait()


def decode_rows(
    model: DeepResonance,
    engine: Callable[[], Engine] | None,
    gen: GenerationConfig,
    media: Prefetch,
    journal: Journal,
    summary: Summary,
    stop: StopOnSignal,
    on_progress: Callable[[int], None] | None,
) -> None:
    """The rows through the chosen decoder as their media arrive, journaled as they end; `engine`: what returns the
    job's engine (model/infer/kept_engine.py job_engine), None for a static decoder."""

    def finish(entries: list[dict]) -> None:
        """Journals rows that ended; a Ctrl-C received meanwhile stops the job here, with them written."""
        journal.write(entries)
        for e in entries:
            if "error" in e:
                summary.failed.append(f"{e['id']}: {e['error']}")
            else:
                summary.answered += 1
        if on_progress and entries:
            on_progress(len(entries))
        if stop.signal:
            raise KeyboardInterrupt

    def ready() -> Iterator[list[tuple[Row, list]] | object]:
        """Each batch's rows whose media loaded (or WAIT, while the media are not loaded and the engine decodes);
        the others are journaled as errors on the way."""
        for item in media:
            if item is WAIT:
                yield item
                continue
            group, loaded = item
            finish([entry(r, error=str(m)) for r, m in zip(group, loaded, strict=True) if isinstance(m, MediaError)])
            yield [(r, m) for r, m in zip(group, loaded, strict=True) if not isinstance(m, MediaError)]

    if engine is not None:
        engine_rows(model, engine(), gen, media, ready(), finish)
        return
    log.info("decoder: %s", gen.decoder)
    for group in ready():  # WAIT never comes: nothing else is busy
        answers = generate(model, [Example(r.input, r.instruction, m) for r, m in group], gen) if group else []
        finish([entry(r, answer=a) for (r, _), a in zip(group, answers, strict=True)])


def engine_rows(
    model: DeepResonance,
    engine: Engine,
    gen: GenerationConfig,
    media: Prefetch,
    groups: Iterator[list[tuple[Row, list]] | object],
    finish: Callable[[list[dict]], None],
) -> None:
    """The loaded `groups` (or WAIT) through `engine`, each row passed to `finish` as it ends."""
    log.info(
        "decoder: engine, %d slots, rows of up to %d positions, a cache of %d blocks of %d",
        engine.slots, engine.length, engine.book.blocks, engine.book.block,
    )  # fmt: skip
    media.busy = lambda: engine.pending > 0  # the engine decodes while the next group loads

    def requests() -> Iterator[Request | object]:
        for group in groups:
            if group is WAIT:
                yield group
                continue
            for r, m in group:
                yield Request(r, Example(r.input, r.instruction, m), gen, row_key(gen.seed, r.id, r.instruction))

    for ended in engine.run(requests()):
        finish([entry(u.handle, model.answer(u.ids), u.error) for u in ended])


def entry(row: Row, answer: str | None = None, error: str | None = None) -> dict:
    """A journal line: the row's key and its answer or its error."""
    key = {"id": row.id, "instruction": row.instruction}
    return {**key, "answer": answer} if error is None else {**key, "error": error}
