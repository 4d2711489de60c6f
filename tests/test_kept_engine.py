"""The engine kept between the jobs of one process (model/infer/kept_engine.py): reused by a job of its shape, built
again for another shape with the old one gone first, and answering a second job as a fresh engine does."""

from __future__ import annotations

import gc
import weakref

import pytest

from model.config import GenerationConfig
from model.engine.sequence import Request
from model.infer.kept_engine import KeptEngine, job_engine
from model.network.checkpoint import load_model
from model.network.deepresonance import Example

GREEDY = GenerationConfig(max_new_tokens=6, do_sample=False, decoder="engine")


@pytest.fixture(scope="module")
def model(tiny_layout):
    return load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)


def answers(engine, texts: list[str]) -> dict[int, list[int]]:
    got = {}
    for ended in engine.run(Request(i, Example("", t, []), GREEDY, i) for i, t in enumerate(texts)):
        got.update((u.handle, u.ids) for u in ended)
    return got


def test_a_job_of_the_kept_engines_shape_reuses_it_and_answers_as_a_fresh_one(model, engine_builds):
    """Two jobs whose longest prompts differ but round to one row width (cache_length): one engine, and the second
    job's answers are those of an engine of its own."""
    kept = KeptEngine()
    first = job_engine(model, 20, GREEDY, 4, None, kept)()
    answers(first, ["A calm piano piece.", "Loud drums and a bass line"])
    second = job_engine(model, 11, GREEDY, 4, None, kept)()
    texts = ["What key is it in?", "Describe the mood.", "Which instruments play?"]
    got = answers(second, texts)
    assert second is first and len(engine_builds) == 1
    assert got == answers(job_engine(model, 11, GREEDY, 4, None)(), texts) and all(got.values())


@pytest.mark.parametrize(
    "other",
    [
        {"longest_prompt": 200},  # a wider row
        {"gen": GenerationConfig(max_new_tokens=9, do_sample=False, decoder="engine")},
        {"gen": GenerationConfig(max_new_tokens=6, do_sample=True, top_k=5, decoder="engine")},  # another top-k cap
        {"most_slots": 3},
        {"compile_prefill": False},
    ],
)
def test_a_job_of_another_shape_builds_its_own_after_the_kept_one_is_gone(model, engine_builds, other):
    kept = KeptEngine()
    shape = {"longest_prompt": 20, "gen": GREEDY, "most_slots": 4, "compile_prefill": None}
    first = weakref.ref(job_engine(model, **shape, kept=kept)())
    gc.collect()
    assert first() is not None  # held by `kept` alone
    build = job_engine(model, **(shape | other), kept=kept)
    assert first() is None  # dropped before the new one was sized
    assert build() is kept.engine and len(engine_builds) == 2


def test_an_engine_left_holding_rows_is_not_reused(model, engine_builds):
    """A job that raised may leave rows queued in its engine: the next job of its shape builds a clean one (reused,
    the old rows would end in the new job's journal)."""
    kept = KeptEngine()
    left = job_engine(model, 20, GREEDY, 4, None, kept)()
    left.submit([Request("old row", Example("", "A calm piano piece.", []), GREEDY, 0)])
    fresh = job_engine(model, 20, GREEDY, 4, None, kept)()
    assert fresh is not left and fresh.pending == 0 and len(engine_builds) == 2


def test_without_a_keeper_every_job_builds_its_engine(model, engine_builds):
    job_engine(model, 20, GREEDY, 4, None)()
    job_engine(model, 20, GREEDY, 4, None)()
    assert len(engine_builds) == 2
