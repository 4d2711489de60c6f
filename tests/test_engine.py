"""The continuous-batching engine: answers equal one-row `generate`, sampling does not depend on the batch, the
on-device sampler draws from the distribution transformers' warpers define, slots are sized and refilled."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model.config import GenerationConfig
from model.engine.kv_cache import PagedKV
from model.engine.sampler import next_token, row_key, uniforms
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.engine.sizing import cache_length
from model.generate.base import generate_ids
from model.network.checkpoint import load_model
from model.network.deepresonance import Example

REFERENCE = GenerationConfig(max_new_tokens=12, do_sample=False, decoder="generate")


def rows() -> list[Example]:
    """Prompts of different lengths and modalities (so prefill pads and slots hold different lengths)."""
    g = torch.Generator().manual_seed(0)
    audio = lambda: torch.randn(3, 1, 128, 204, generator=g)  # noqa: E731
    return [
        Example("<Audio>", "Describe the music.", [("audio", audio())]),
        Example("", "Hi", []),
        Example(
            "Listen to this: <Image> and <Audio>",
            "What is the key?",
            [("image", torch.randn(3, 224, 224)), ("audio", audio())],
        ),
        Example("<Audio>", "What instruments are playing in this long piece of music?", [("audio", audio())]),
        Example("", "Tell me about jazz.", []),
        Example("<Video>", "What happens?", [("video", torch.randn(15, 3, 2, 224, 224, generator=g))]),
        Example("<Audio>", "Tempo?", [("audio", audio())]),
    ]


def run(engine: Engine, examples, gens, keys=None) -> dict[int, list[int]]:
    keys = keys or [row_key(0, str(i), ex.instruction) for i, ex in enumerate(examples)]
    out = {}
    for ended in engine.run(
        Request(i, ex, g, k) for i, (ex, g, k) in enumerate(zip(examples, gens, keys, strict=True))
    ):
        for u in ended:
            assert u.error is None and u.handle not in out
            out[u.handle] = u.ids
    return out


@pytest.fixture(scope="module", params=["alpha", "beta", "beta, merged"])
def model(request, tiny_layout):
    """The tiny model with LoRA beside its weights (the engine runs transformers' layers), or merged into them as
    `dr infer` and `dr serve` load it (the engine runs fused_layer.py's joined projections)."""
    variant, _, merged = request.param.partition(", ")
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir(variant), tiny_layout.imagebind)
    if merged:
        model.merge_lora()
    return model


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_greedy_answers_equal_one_row_generate_while_slots_refill(model, kernel, monkeypatch):
    """7 rows through 2 slots with different max_new_tokens: rows end at different steps and their slots take the
    next rows in flight (refills counted), and every row's ids equal `generate` on that row alone."""
    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (3, 12, 5, 9, 1, 7, 12)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    prefills = []
    real = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, r, s: prefills.append(len(r)) or real(self, r, s))
    length = cache_length(max(model.example_length(ex) for ex in examples), 12)
    engine = Engine(model, 2, length, 12, k_cap=1, kernel=kernel, sync_every=2, refill_min=1)
    assert run(engine, examples, [replace(g, decoder="engine") for g in gens]) == expected
    assert sum(prefills) == 7 and len(prefills) >= 4  # 2 at the start, then one or two at a time as rows end


def test_padded_prefill_of_the_graph_path_equals_one_row_generate(model):
    """The prefill path that replays CUDA graphs on a GPU (model/engine/prefill_graphs.py) runs here eagerly, with the
    same padded widths and reused input buffers: every row's ids still equal `generate` on that row alone."""
    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (3, 12, 5, 9, 1, 7, 12)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    length = cache_length(max(model.example_length(ex) for ex in examples), 12)
    engine = Engine(model, 3, length, 12, k_cap=1, sync_every=2, refill_min=1, graph_prefill=True)
    assert run(engine, examples, gens) == expected
    widths = [model.example_length(ex) for ex in examples]
    assert engine.graphs.shapes and all(w % 64 == 0 or w == length for _, w in engine.graphs.shapes)
    assert max(w for _, w in engine.graphs.shapes) > max(widths)  # the padding ran


@pytest.mark.parametrize("decoder", ["engine", "engine, graph prefill", "static"])
def test_a_row_with_non_finite_media_leaves_nothing_for_the_next_rows(model, decoder):
    """A row whose media features are NaN fills its slot's cache (or the static loop's) with NaN past where the next,
    shorter rows write. Those columns are masked, but masked weight 0 x NaN = NaN: the next rows in that one slot must
    still get the answers they get without the poisoned row before them."""
    audio = model.encode_media([rows()[0].media[0]])[0]
    # its NaN clips last, so a graph prefill's reused padding would carry them into the next row's slot
    poison = Example("Listen closely to this recording: <Audio>", "Describe it.", [("audio", audio * torch.nan)])
    after = [Example("", "Hi", []), rows()[4]]
    assert max(map(model.example_length, after)) < model.example_length(poison) < 64  # one padded prefill width
    gen = replace(REFERENCE, max_new_tokens=6, decoder="static")
    if decoder == "static":
        expected = [generate_ids(model, [ex], gen)[0] for ex in after]
        generate_ids(model, [poison], gen)
        assert [generate_ids(model, [ex], gen)[0] for ex in after] == expected
        return
    length = cache_length(model.example_length(poison), 6)

    def one_slot(examples: list[Example]) -> dict[int, list[int]]:
        engine = Engine(model, 1, length, 6, k_cap=1, sync_every=2, graph_prefill=decoder != "engine")
        return run(engine, examples, [gen] * len(examples))

    expected = one_slot(after)
    got = one_slot([poison, *after])
    assert [got[1], got[2]] == [expected[0], expected[1]]


def test_rows_end_at_stop_sequences_and_eos(stopping_root):
    """With a model whose answers end early (EOS), the engine's ids and answers are `generate`'s, cut the same way."""
    from ckpt.layout import layout

    paths = layout(stopping_root)
    model = load_model(paths.vicuna, paths.delta_dir("alpha"), paths.imagebind)
    examples = rows()
    gen = replace(REFERENCE, max_new_tokens=24)
    expected = [generate_ids(model, [ex], gen)[0] for ex in examples]
    assert len({len(ids) for ids in expected}) > 2 and min(len(ids) for ids in expected) < 24  # ends vary
    assert generate_ids(model, examples, replace(gen, decoder="engine")) == expected


def test_sampled_answers_do_not_depend_on_batch_or_order(model):
    examples = rows()
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    keys = [row_key(7, str(i), ex.instruction) for i, ex in enumerate(examples)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 10)
    results = []
    for slots, order in ((1, range(7)), (3, range(7)), (8, reversed(range(7)))):
        order = list(order)
        engine = Engine(model, slots, length, 10, k_cap=20, sync_every=3, narrow=(4, 2))
        got = run(engine, [examples[i] for i in order], [gen] * 7, [keys[i] for i in order])
        results.append({order[j]: ids for j, ids in got.items()})
    assert results[0] == results[1] == results[2]
    other = [row_key(8, str(i), ex.instruction) for i, ex in enumerate(examples)]
    assert run(Engine(model, 8, length, 10, k_cap=20), examples, [gen] * 7, other) != results[0]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 10, 0.8), (1.3, 0, 0.5), (0.1, 50, 1.0), (2.0, 5, 0.95), (1.0, 0, 1.0)]
)
def test_sampler_draws_from_transformers_warped_distribution(temperature, top_k, top_p):
    """The inverse-CDF draw at N evenly spaced uniforms gives each token a share within 1/N of the probability
    transformers' temperature, top-k and top-p warpers give it (so a top-p or top-k that is ignored or changed shows
    as mass on removed tokens)."""
    g = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    vocab, n = 60, 4000
    logits = torch.randn(3, vocab, generator=g) * 3
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(LogitsProcessorList(warpers)(None, logits.clone()), dim=-1)
    u = (torch.arange(n) + 0.5) / n
    rows = logits.repeat_interleave(n, 0)
    full = lambda v, dtype: torch.full((3 * n,), v, dtype=dtype)  # noqa: E731
    drawn = next_token(
        rows,
        full(False, torch.bool),
        full(temperature, torch.float),
        full(top_k, torch.long),
        full(top_p, torch.float),
        u.repeat(3),
        vocab,  # candidates beyond top-k, so the per-row top-k itself must remove them
    ).view(3, n)
    share = torch.stack([torch.bincount(r, minlength=vocab) for r in drawn]).float() / n
    assert (share - expected).abs().max() <= 1 / n + 1e-6
    assert not ((share > 0) & (expected == 0)).any()  # a removed token is never drawn


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(4, 30)
    greedy = torch.tensor([True, False, True, False])
    picked = next_token(
        logits, greedy, torch.full((4,), 5.0), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.rand(4), 30
    )
    assert picked[greedy].tolist() == logits.argmax(-1)[greedy].tolist()


def test_uniforms_are_uniform_and_uncorrelated():
    keys = torch.tensor([row_key(1337, f"r{i}", "Describe the music.") for i in range(2000)]).repeat_interleave(50)
    counters = torch.arange(50).repeat(2000)
    u = uniforms(keys, counters)
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = len(u) / 20
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 43.8  # the 99.9% quantile of chi-square with 19 degrees of freedom
    grid = u.view(2000, 50)
    assert abs(torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]))[0, 1]) < 0.02
    assert abs(torch.corrcoef(torch.stack([grid[:-1].flatten(), grid[1:].flatten()]))[0, 1]) < 0.02
    assert row_key(1, "a", "q") != row_key(2, "a", "q") != row_key(1, "b", "q") != row_key(1, "a", "r")


def test_a_question_through_the_engine_runs_the_encoder_once(model, monkeypatch):
    """`dr ask`'s path (`generate` with the engine): one encoder call per modality of the question, not one more
    for a batch prepared and then prepared again by the engine."""
    calls = []
    forward = model.visual_encoder.forward
    monkeypatch.setattr(
        model.visual_encoder, "forward", lambda modality, x: calls.append(modality) or forward(modality, x)
    )
    question = rows()[2]  # an image and an audio clip
    generate_ids(model, [question], replace(REFERENCE, max_new_tokens=3, decoder="engine"))
    assert sorted(calls) == ["audio", "image"]


def test_rows_that_cannot_fit_or_exceed_the_budget_are_refused_by_name(model):
    engine = Engine(model, 2, 128, 8, k_cap=1)
    long = Example("", "word " * 200, [])
    ok = Example("", "Hi", [])
    gen = replace(REFERENCE, max_new_tokens=8)
    ended = [
        u
        for batch in engine.run(
            [
                Request("long", long, gen, 1),
                Request("ok", ok, gen, 2),
                Request("big", ok, replace(gen, max_new_tokens=9), 3),
            ]
        )
        for u in batch
    ]
    errors = {u.handle: u.error for u in ended}
    assert "do not fit the engine's 128 positions" in errors["long"]
    assert "max_new_tokens 9 is over this engine's 8" in errors["big"]
    assert errors["ok"] is None


def test_cancel_frees_the_slot_for_the_next_row(model):
    engine = Engine(model, 1, 128, 50, k_cap=1, sync_every=2)
    gen = replace(REFERENCE, max_new_tokens=50)
    engine.submit([Request("a", Example("", "Hi", []), gen, 1), Request("b", Example("", "Hello", []), gen, 2)])
    engine.advance()
    assert engine.handles == ["a"]
    engine.cancel("a")
    engine.advance()  # the cancelled row's slot is freed at this sync
    engine.advance()
    assert engine.handles == ["b"]
    finished = []
    while engine.pending:
        finished += [u.handle for u in engine.advance() if u.done]
    assert finished == ["b"]


def test_no_steps_run_once_every_row_reached_its_budget(model, step_widths):
    """One row of 5 new tokens, 2 steps per advance: the prefill draws token 1 and steps draw tokens 2..5, so two
    advances of 2 steps (4 steps) finish it; the advance that reports it runs none (with the state copied one
    advance behind, a blind engine would run 2 more)."""
    engine = Engine(model, 1, 128, 8, k_cap=1, sync_every=2)
    assert run(engine, [Example("", "Hi", [])], [replace(REFERENCE, max_new_tokens=5)]) == {
        0: generate_ids(model, [Example("", "Hi", [])], replace(REFERENCE, max_new_tokens=5))[0]
    }
    assert len(step_widths) == 4


def test_finished_and_free_slots_read_no_cache_blocks_and_only_a_partly_filled_block_is_masked():
    """FlexAttention's block mask: a live slot at position 130 reads columns 0..129, one full 128-column block and
    its second block masked (named first); a live slot at 5 one masked block; at 256 two full blocks, none masked;
    finished or never-filled slots none."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    kv = PagedKV(config, 5, 3, 16, torch.float32, torch.device("cpu"), "flex", block=128)
    kv.table.copy_(torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 0], [0, 0, 0], [6, 7, 8]]))
    kv.pos.copy_(torch.tensor([130, 5, 130, 0, 256]))
    visible = kv.step_inputs(5, torch.tensor([True, True, False, False, True]))[0].visible
    assert visible.full.flatten().tolist() == [1, 0, 0, 0, 2]
    assert visible.partial.flatten().tolist() == [1, 1, 0, 0, 0]
    assert visible.partial_index[[0, 1], 0, 0, 0].tolist() == [2, 3]


def test_compiled_step_traces_one_layer_per_width_for_all_layers(model, monkeypatch, step_widths, tmp_path):
    """Dynamo traces the decode step's layer once per width, whatever the number of layers, the step's end once per
    width, and the packed prefill's layer once for every layer and every number of positions: each extra trace costs
    a process about 0.3 s on a 7B model, and a trace per layer would bring back the 10-13 s of a whole-model trace
    (flex_attention's deprecated return_lse flag once caused a second). Dynamo alone (backend "eager") finds the
    guards that fail, which is what makes it retrace, without Inductor's CPU build. The job ends with one row, so the
    step also runs at the narrow width; its prefills hold different numbers of positions. The prefill's layer is
    traced while the engine is built, before its first request."""
    import torch.nn.attention.flex_attention as flex

    from model.engine import model_runner, scheduler

    assert model.llama_model.config.num_hidden_layers >= 2
    monkeypatch.setattr(model_runner, "COMPILE_PREFILL", True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no compiled form stored before (compile_cache.py)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real(fn, **options, backend="eager"))
    prefilled = []
    packed = scheduler.packed_prefill
    monkeypatch.setattr(scheduler, "packed_prefill", lambda *a, **k: prefilled.append(sum(a[4])) or packed(*a, **k))
    monkeypatch.setattr(flex, "_WARNINGS_SHOWN", set())  # as in a fresh process, whatever ran before
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    examples = rows()[:4]
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (3, 9, 5, 7)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 9)
    engine = Engine(model, 2, length, 9, k_cap=1, kernel="flex", compile=True, sync_every=2, refill_min=1, narrow=[1])
    # the build traced the prefill's layer (the step's on a CPU at its first use: nothing is captured here)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(run(engine, examples, gens)) == 4
    assert set(step_widths) == {1, 2} and len(set(prefilled)) >= 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * 2 + 1  # (layer, end) x widths, prefill
    torch._dynamo.reset()


def test_last_rows_move_to_the_front_and_decode_at_narrow_widths(model, monkeypatch, step_widths):
    """9 rows through 6 slots whose step also runs at widths 4 and 2: when the queue is empty, rows move into the first
    slots (keys, values and state) and the step narrows. Every row's ids still equal one-row `generate`, and each
    finished row is reported once (a move that lost a row's cache, its state, or let the state copy taken before the
    move report the slot's previous row, would break that)."""
    examples = rows() + rows()[:2]
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (12, 2, 11, 3, 1, 12, 2, 9, 12)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    moved = []
    move = PagedKV.move
    monkeypatch.setattr(PagedKV, "move", lambda self, src, dst: moved.append(list(src)) or move(self, src, dst))
    length = cache_length(max(model.example_length(ex) for ex in examples), 12)
    engine = Engine(model, 6, length, 12, k_cap=1, sync_every=2, refill_min=1, narrow=(4, 2))
    assert run(engine, examples, gens) == expected
    assert {6, 4, 2} <= set(step_widths) and moved and any(s >= 4 for m in moved for s in m)
    assert step_widths.index(2) > step_widths.index(4) > step_widths.index(6)
    assert engine.state.done.all()  # a slot left behind is free, so a wide step reads none of its cache


def test_each_slot_count_gets_a_static_step(model, monkeypatch, tmp_path):
    """Engines of three slot counts in one process: every compiled step has static shapes. With torch.compile's
    automatic dynamic shapes the third got a symbolic-slot step, whose answers on an H200 were wrong
    (benchmarks/results/2026-12-02-h200-engine-run5-prefill-graphs/engine_sequence_wrong_answers_h200.log).
    Dynamo alone (backend "eager") shows the traced shapes. Only the packed prefill's layer is symbolic, by design
    (its number of positions)."""
    from model.engine import model_runner

    real = torch.compile
    symbolic = []

    def compile_with_the_engines_options(fn, mode=None, **options):
        def backend(gm, example_inputs):
            symbolic.append((fn.__name__, any(isinstance(x, torch.SymInt) for x in example_inputs)))
            return gm.forward

        return real(fn, backend=backend, **options)

    monkeypatch.setattr(torch, "compile", compile_with_the_engines_options)
    monkeypatch.setattr(model_runner, "COMPILE_PREFILL", True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # every step traced here, none loaded
    torch._dynamo.reset()
    examples = rows()[:3]
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (3, 5, 4)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 5)
    for slots in (1, 2, 3):
        engine = Engine(model, slots, length, 5, k_cap=1, compile=True, sync_every=2, refill_min=1)
        assert len(run(engine, examples, gens)) == 3
    steps = [dynamic for name, dynamic in symbolic if name != "prefill_layer"]
    assert len(steps) >= 3 and not any(steps)
    assert ("prefill_layer", True) in symbolic
    torch._dynamo.reset()


def test_a_source_with_nothing_ready_lets_the_engine_decode_what_it_has(model):
    """A request source (a job whose next media group is still loading) may say WAIT: an engine with rows decodes them
    and asks again, instead of waiting on the source; an idle one asks on. Every row still equals one-row `generate`."""
    from model.engine.scheduler import WAIT

    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (3, 2, 6, 4, 5, 2, 3)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    keys = [row_key(0, str(i), ex.instruction) for i, ex in enumerate(examples)]
    ended: dict[int, list[int]] = {}

    def source():
        yield from (WAIT, WAIT)  # nothing queued yet: the engine must not stop here
        for i in (0, 1):
            yield Request(i, examples[i], gens[i], keys[i])
        for _ in range(1000):
            if ended:
                break
            yield WAIT
        else:
            raise AssertionError("the engine kept asking its source instead of decoding the rows it had")
        for i in range(2, 7):
            yield Request(i, examples[i], gens[i], keys[i])

    engine = Engine(model, 4, cache_length(max(model.example_length(ex) for ex in examples), 6), 6, k_cap=1)
    for batch in engine.run(source()):
        ended.update((u.handle, u.ids) for u in batch)
    assert ended == expected
