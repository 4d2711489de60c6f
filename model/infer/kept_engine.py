"""The engine a job decodes with: sized for its rows, or the one the process's last job built, where that job's shape
was the same (`dr infer` given several datasets answers them one after another with one loaded model)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

from model.config import GenerationConfig
from model.engine.scheduler import Engine
from model.engine.sizing import cache_length, engine_size, top_k_cap
from model.network.deepresonance import DeepResonance


@dataclass(frozen=True)
class EngineShape:
    """What an engine is built from beside the model: two jobs that agree on these get the same engine (the pool's
    size follows from them and the card: model/engine/sizing.py)."""

    length: int  # positions a row may hold (cache_length: prompts of other lengths share it)
    max_new_tokens: int
    most_slots: int
    k_cap: int
    compile_prefill: bool | None


class KeptEngine:
    """The engine of a process's last job, kept for its next job of the same shape: building one again costs its
    pool, its steps' CUDA-graph captures and its compiled forms' loads (on an H100 a second dataset's first answers
    came 3.2 s after the first's last, benchmarks/results/2026-12-08-h100-stored-and-load/). One model, one engine at
    a time: a job of another shape drops the kept one before sizing its own, so the new pool is sized with that
    memory free, as in a process of its own."""

    def __init__(self) -> None:
        self.shape: EngineShape | None = None
        self.engine: Engine | None = None

    def take(self, shape: EngineShape) -> Engine | None:
        """The kept engine if it was built for `shape` and holds no row (a job that raised may have left some queued
        or decoding), else None (the kept one dropped and its memory freed)."""
        if self.engine is not None and (shape != self.shape or self.engine.pending):
            self.shape = self.engine = None
            gc.collect()  # an engine in a reference cycle would hold its pool until the collector's next full pass
        return self.engine

    def keep(self, shape: EngineShape, engine: Engine) -> None:
        self.shape, self.engine = shape, engine


def job_engine(
    model: DeepResonance,
    longest_prompt: int,
    gen: GenerationConfig,
    most_slots: int,
    compile_prefill: bool | None,
    kept: KeptEngine | None = None,
) -> Callable[[], Engine]:
    """A function that returns the job's engine: `kept`'s where its shape is this job's, else one sized now (call it
    before the job's loader allocates anything: the pool is a share of the card's memory) and built when the
    function is called (beside the loader), then kept in `kept`."""
    shape = EngineShape(
        cache_length(longest_prompt, gen.max_new_tokens), gen.max_new_tokens, most_slots, top_k_cap(model, gen),
        compile_prefill,
    )  # fmt: skip
    engine = kept.take(shape) if kept is not None else None
    if engine is not None:
        return lambda: engine
    slots, length, blocks = engine_size(model, longest_prompt, gen.max_new_tokens, most_slots)

    def build() -> Engine:
        built = Engine(
            model, slots, length, gen.max_new_tokens, k_cap=shape.k_cap, blocks=blocks, compile_prefill=compile_prefill
        )
        if kept is not None:
            kept.keep(shape, built)
        return built

    return build
