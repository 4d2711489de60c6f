"""The paged cache (model/engine/block_pool.py, kv_cache.py): rows hold the blocks their positions fill, grow block by
block, are preempted and decoded again when the pool runs short, and every row's ids stay those of one-row
`generate`; the book's arithmetic against hand-worked tables."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import GenerationConfig
from model.engine import sizing
from model.engine.block_pool import BlockPool
from model.engine.kv_cache import BLOCK, bytes_per_position
from model.engine.sampler import row_key
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.engine.sizing import cache_length
from model.generate.base import generate_ids
from model.network.checkpoint import load_model
from model.network.deepresonance import Example
from tests.test_engine import REFERENCE, rows, run


@pytest.fixture(scope="module")
def model(tiny_layout):
    return load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)


def test_the_book_gives_takes_and_moves_blocks():
    book = BlockPool(blocks=6, slots=3, per_row=4, block=4)
    assert book.available == 5  # block 0 is the scratch block
    assert book.grow(0, 5) and book.table[0].tolist() == [1, 2, 0, 0]  # 5 positions: 2 blocks of 4
    assert book.grow(1, 4) and book.table[1].tolist() == [3, 0, 0, 0]
    assert book.grow(0, 8) and book.held[0] == 2  # still 2 blocks
    assert not book.grow(1, 13) and book.held[1] == 1  # needs 3 more, 2 free: nothing given
    assert book.grow(0, 9) and book.table[0].tolist() == [1, 2, 4, 0]
    assert book.owner.tolist() == [-1, 0, 0, 1, 0, -1] and book.place.tolist()[1:5] == [0, 1, 0, 2]
    # prefill positions: slot 0's 6 columns in blocks 1 and 2, slot 1's 3 in block 3, padding into the scratch block
    index = book.prefill_index([0, 1], [6, 3], 6)
    assert index.tolist() == [[4, 5, 6, 7, 8, 9], [12, 13, 14, 3, 0, 1]]
    book.released.clear()
    book.release(0)
    assert sorted(book.free) == [1, 2, 4, 5] and book.released == [1, 2, 4] and book.table[0].tolist() == [0] * 4
    book.move([1], [2])
    assert book.table[2].tolist() == [3, 0, 0, 0] and book.held[1:] == [0, 1] and book.owner[3] == 2


def test_a_small_pool_preempts_and_every_answer_still_equals_one_row_generate(model, monkeypatch):
    """7 rows through 3 slots whose pool holds 11 blocks of 8 positions, fewer than three of the longest rows need:
    rows grow block by block, the youngest is preempted when a growing row finds the pool empty, and every row's ids
    still equal `generate` on that row alone, with each row reported once."""
    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (12, 12, 5, 12, 1, 12, 9)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    sizes = [model.example_length(ex) for ex in examples]
    assert max(-(-(n + 12) // 8) for n in sizes) * 3 > 11  # three long rows would need more than the pool
    grown = []
    real = BlockPool.grow
    monkeypatch.setattr(BlockPool, "grow", lambda self, s, n: grown.append(n) or real(self, s, n))
    length = cache_length(max(sizes), 12)
    for kernel in ("sdpa", "flex"):
        engine = Engine(model, 3, length, 12, k_cap=1, kernel=kernel, sync_every=2, refill_min=1, blocks=12, block=8)
        assert run(engine, examples, gens) == expected
        assert engine.preempted > 0 and engine.state.done.all()
        assert engine.book.available == 11 and not engine.book.owner.ge(0).any()  # every block back in the pool
    assert any(n % 8 and n > max(sizes) for n in grown)  # rows grew past their prompt's blocks


def test_sampled_answers_do_not_depend_on_preemption(model):
    """A preempted row decoded again draws the same tokens: its stream is its own (counter-based), not the batch's."""
    examples = rows()
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9, top_k=20, seed=3)
    keys = [row_key(3, str(i), ex.instruction) for i, ex in enumerate(examples)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 12)
    roomy = Engine(model, 3, length, 12, k_cap=20, sync_every=2, refill_min=1, block=8)
    tight = Engine(model, 3, length, 12, k_cap=20, sync_every=2, refill_min=1, blocks=12, block=8)
    assert run(tight, examples, [gen] * 7, keys) == run(roomy, examples, [gen] * 7, keys)
    assert tight.preempted > 0 and roomy.preempted == 0


def test_rows_in_flight_are_bounded_by_the_tokens_they_hold_not_their_budget(model, monkeypatch):
    """Short answers under a long budget: a pool that holds four rows' prompts and first tokens would, reserving each
    row's prompt + 48 tokens, hold one; paged, the four slots all decode together, since the rows end long before their
    budget."""
    examples = [Example("", "Hi", []), Example("", "Tell me about jazz.", [])] * 3
    gen = replace(REFERENCE, max_new_tokens=48, decoder="engine")
    short = [replace(gen, max_new_tokens=3)] * 6
    longest = max(model.example_length(ex) for ex in examples)
    blocks = 4 * -(-(longest + 2) // 8) + 1
    assert (blocks - 1) // -(-(longest + 48) // 8) == 1
    busy = []
    real = Engine.advance
    monkeypatch.setattr(Engine, "advance", lambda self: busy.append(self.active) or real(self))
    length = cache_length(longest, 48)
    engine = Engine(model, 4, length, 48, k_cap=1, sync_every=2, refill_min=1, blocks=blocks, block=8)
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, short, strict=True))}
    assert run(engine, examples, short) == expected
    assert max(busy) == 4 and engine.preempted == 0


def test_datasets_of_other_prompt_lengths_get_one_engine_shape(model, monkeypatch):
    """The compiled step's shapes are the engine's (slots, positions per row, pool blocks): jobs at `dr infer`'s
    512-token budget on a captioning set (17-position prompts) and on a multiple-choice set (210) must get the same
    ones, and so must free memory that differs by less than a pool step, or a second process on another dataset
    compiles its step again instead of loading it from the compile cache."""
    config = model.llama_model.config
    per_block = BLOCK * bytes_per_position(config, torch.float32)
    monkeypatch.setattr(sizing, "memory_budget", lambda m: 1000 * per_block)
    captions = sizing.engine_size(model, 17, 512, 256)
    assert captions == sizing.engine_size(model, 210, 512, 256) == (256, 1024, 960)
    monkeypatch.setattr(sizing, "memory_budget", lambda m: 1020 * per_block + 7)
    assert sizing.engine_size(model, 210, 512, 256) == captions


def test_a_row_longer_than_the_pool_is_refused_by_name(model):
    engine = Engine(model, 2, 128, 8, k_cap=1, blocks=3, block=8)  # 2 usable blocks: 16 positions
    gen = replace(REFERENCE, max_new_tokens=8)
    ended = [u for batch in engine.run([Request("long", Example("", "word " * 20, []), gen, 1)]) for u in batch]
    assert "do not fit the cache" in ended[0].error


def test_blocks_come_from_the_memory_budget(model, monkeypatch):
    config = model.llama_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    assert bytes_per_position(config, torch.float32) == per_position
    per_block = BLOCK * per_position
    assert BLOCK == 32  # the block counts below are worked out for 32-position blocks
    assert cache_length(40, 100) == 256 and cache_length(200, 300) == 512  # 5 blocks -> 8; 16
    assert cache_length(300, 400) == 1024  # 22 blocks -> 32
    monkeypatch.setattr(sizing, "memory_budget", lambda m: 200 * per_block + 5)
    assert sizing.engine_size(model, 40, 100, 256) == (191, 256, 192)  # rounded down to 3 x 64 blocks; a row each
    assert sizing.engine_size(model, 40, 100, 64) == (64, 256, 192)  # 64 rows of 8 blocks would be 513: the budget
    monkeypatch.setattr(sizing, "memory_budget", lambda m: 40 * per_block)
    assert sizing.engine_size(model, 40, 100, 256) == (39, 256, 40)  # under one step: every block
    assert sizing.engine_size(model, 40, 100, 4) == (4, 256, 33)  # 4 slots of 8 blocks and the scratch: the rest free
    monkeypatch.setattr(sizing, "memory_budget", lambda m: 2 * per_block)
    with pytest.raises(MemoryError, match="one row of 140 positions needs .* GiB of cache"):
        Engine.sized(model, 40, 100, 64)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_dead_slots_and_prefill_padding_leave_only_zeros_in_the_scratch_block(kernel):
    """Every row's unused table entries name the scratch block, so whatever lands there is read (with weight 0) by
    live rows; a non-finite key of a dead slot or of a prompt's padding would turn that 0 into NaN."""
    from transformers import LlamaConfig

    from model.engine.kv_cache import PagedKV, decode_attention

    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    kv = PagedKV(config, 3, 2, 7, torch.float32, torch.device("cpu"), kernel, block=4)
    assert kv.book.grow(0, 3) and kv.book.grow(1, 2)
    kv.sync()
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    k[1, :, 2:], v[1, :, 2:] = torch.nan, torch.inf  # row 1's padding columns
    kv.prefill(0, kv.book.prefill_index([0, 1], [3, 2], 5), q, k, v, 1.0)
    kv.pos[:2] = torch.tensor([3, 2])
    assert kv.keys[0].isfinite().all() and kv.values[0].isfinite().all()
    assert kv.book.grow(1, 6)  # slot 1 crosses into a second block; slot 2 is free
    kv.sync()
    alive = torch.tensor([True, False, False])
    kv.pos[2] = 4  # a free slot's stale position points at an unallocated table entry: the scratch block
    q, k, v = (torch.randn(3, 2, 1, 8) for _ in range(3))
    k[1:], v[1:] = torch.nan, torch.nan
    out = decode_attention(kv.step_inputs(3, alive)[0], q, k, v, 1.0)
    assert out[0].isfinite().all()
    scratch = [pool[0, :, :4] for pool in (kv.keys[0], kv.values[0])]
    assert all((s == 0).all() for s in scratch)
    assert kv.keys[0].isfinite().all() and kv.values[0].isfinite().all()


def test_a_streaming_engine_reserves_whole_budgets_and_never_preempts(model):
    """The pool of the preempting test above, streaming: rows wait in the queue until their whole budget fits, so none
    is preempted (a streamed answer cannot be taken back), and the answers are the same."""
    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (12, 12, 5, 12, 1, 12, 9)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    length = cache_length(max(model.example_length(ex) for ex in examples), 12)
    engine = Engine(model, 3, length, 12, k_cap=1, sync_every=2, refill_min=1, blocks=12, block=8, stream=True)
    got = {}
    for ended in engine.run(Request(i, ex, g, 0) for i, (ex, g) in enumerate(zip(examples, gens, strict=True))):
        got.update((u.handle, u.ids) for u in ended if u.done)
    assert got == expected and engine.preempted == 0


def test_jobs_on_other_datasets_size_to_the_same_compiled_shapes(model, monkeypatch):
    """A second job, on a dataset whose longest prompt differs and with a little more or less free memory, gets the
    same slots, row width and pool (every shape the compiled step is built for), so it loads the step from the compile
    cache instead of compiling it again."""
    per_block = BLOCK * bytes_per_position(model.llama_model.config, model.dtype)
    shapes = set()
    for longest, free_blocks in ((60, 710), (200, 705), (130, 767)):
        monkeypatch.setattr(sizing, "memory_budget", lambda m, n=free_blocks: n * per_block)
        shapes.add(sizing.engine_size(model, longest, 512, 256))
    assert shapes == {(256, 1024, 704)}


def test_a_pools_budget_is_the_same_whatever_else_the_process_holds(monkeypatch):
    """The pool is a shape of the compiled step: one model on one kind of card gets one budget, whatever the allocator
    holds cached (a load's temporaries) and whatever else the process still holds within reason (two jobs of one
    H200 process had differed by a block step, and the second compiled its step anew); only when much less is free
    (another process on the card) does it take a share of what is free instead."""
    from types import SimpleNamespace

    gib = 2**30

    class Device:
        """One device as cudaMemGetInfo sees it: 80 GiB, 15 GiB of them the model's weights, `held` more in tensors
        and `cached` more held by the allocator."""

        def __init__(self, held: int, cached: int) -> None:
            self.held, self.cached = held, cached

        def mem_get_info(self, device=None) -> tuple[int, int]:
            return 80 * gib - 15 * gib - self.held - self.cached, 80 * gib

        def empty_cache(self) -> None:
            self.cached = 0

    def tensor(size: int, device: str) -> SimpleNamespace:
        return SimpleNamespace(numel=lambda: size, element_size=lambda: 1, device=torch.device(device))

    weights = [tensor(14 * gib, "cuda"), tensor(gib, "cuda"), tensor(3 * gib, "cpu")]  # the CPU one is not resident
    model = SimpleNamespace(
        llama_model=SimpleNamespace(device=torch.device("cuda", 0)), parameters=lambda: weights[:2],
        buffers=lambda: weights[2:],
    )  # fmt: skip
    budgets = []
    for held, cached in ((0, 0), (0, 3 * gib), (gib, 0), (20 * gib, 0)):
        device = Device(held, cached)
        monkeypatch.setattr(torch.cuda, "mem_get_info", device.mem_get_info)
        monkeypatch.setattr(torch.cuda, "empty_cache", device.empty_cache)
        budgets.append(sizing.memory_budget(model))
    share = sizing.MEMORY_SHARE
    # 65 GiB beyond the weights; with 20 GiB held elsewhere 45 GiB are free, under the 65 x share budget
    assert budgets == [int(65 * gib * share)] * 3 + [int(45 * gib * share)]


def test_prefills_are_spread_over_advances_while_rows_decode(model, monkeypatch):
    """With 60 prompt positions an advance while others decode, a refill of several rows goes in over several
    advances (one row each where one alone is over 60), the first fill of an idle engine is not held back, and the
    answers are unchanged."""
    from model.engine import scheduler

    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (12, 2, 2, 2, 12, 12, 2)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    sizes = [model.example_length(ex) for ex in examples]
    monkeypatch.setattr(scheduler, "PREFILL_POSITIONS", 60)
    filled: dict[int, list[int]] = {}
    real = Engine._prefill
    monkeypatch.setattr(
        Engine,
        "_prefill",
        lambda self, r, s: filled.setdefault(self.advances, []).extend(q.size for q in r) or real(self, r, s),
    )
    length = cache_length(max(sizes), 12)
    engine = Engine(model, 4, length, 12, k_cap=1, sync_every=2, refill_min=1)
    assert run(engine, examples, gens) == expected
    first, *later = filled.values()
    assert len(first) == 4  # nothing decoded yet: every free slot filled at once
    assert later and all(len(p) == 1 or sum(p) <= 60 for p in later)
    assert sum(len(p) for p in filled.values()) == 7


def test_prefill_calls_hold_at_most_their_positions_in_queue_order():
    """A refill's rows go in as calls of at most `positions` prompt positions (packed: no padding), in queue order, at
    least one row a call (worked by hand)."""
    from model.engine.scheduler import prefill_chunks

    requests = [Request(i, None, REFERENCE, i) for i in range(6)]
    for r, n in zip(requests, [30, 200, 31, 199, 32, 198], strict=True):
        r.size = n
    assert [[r.handle for r in c] for c in prefill_chunks(requests, positions=400)] == [[0, 1, 2], [3, 4], [5]]
    assert [[r.handle for r in c] for c in prefill_chunks(requests, positions=100)] == [[0], [1], [2], [3], [4], [5]]


def test_a_refill_split_into_packed_calls_keeps_every_answer(model, monkeypatch):
    """Seven prompts of different lengths fill an idle engine in several packed calls of few positions each (prompts
    end to end, each attending to itself alone, at its own positions): every row's ids still equal one-row
    `generate`, and no call holds more than its positions unless it holds one row."""
    from model.engine import scheduler

    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (6, 2, 5, 3, 6, 4, 2)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    sizes = [model.example_length(ex) for ex in examples]
    monkeypatch.setattr(scheduler, "PREFILL_CHUNK", max(sizes) + min(sizes))
    calls: list[list[int]] = []
    real = Engine._prefill
    monkeypatch.setattr(Engine, "_prefill", lambda self, r, s: calls.append([q.size for q in r]) or real(self, r, s))
    engine = Engine(model, 7, cache_length(max(sizes), 6), 6, k_cap=1, sync_every=2)
    assert run(engine, examples, gens) == expected
    assert [n for c in calls for n in c] == sizes and len(calls) >= 3
    assert all(sum(c) <= max(sizes) + min(sizes) or len(c) == 1 for c in calls)


@pytest.mark.slow
def test_the_compiled_step_writes_the_pool_in_place():
    """Compiled, a write through a view of a graph input (`keys[0][:, write] = ...`) copies the whole input: the
    pool, every layer of every step (on an H100 the paged engine ran 2.7x slower for it,
    benchmarks/results/2026-12-05-h100-paged-cache-first/). Inductor's code for the decode attention (the SDPA kernel:
    Inductor on a CPU cannot build FlexAttention with its log-sum-exp) has no loop over the pool's elements."""
    import re

    from torch._inductor.utils import run_and_get_code
    from transformers import LlamaConfig

    from model.engine.kv_cache import PagedKV, decode_attention

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    kv = PagedKV(config, 4, -(-100 // BLOCK), 512, torch.float32, torch.device("cpu"), "sdpa")  # rows of 100
    for s in range(3):
        assert kv.book.grow(s, 100)
    kv.sync()
    kv.pos[:3] = 99
    q, k, v = (torch.randn(4, 2, 1, 32) for _ in range(3))
    compiled = torch.compile(decode_attention, fullgraph=True, dynamic=False)
    _, codes = run_and_get_code(compiled, kv.step_inputs(4, torch.tensor([True] * 3 + [False]))[0], q, k, v, 0.2)
    elements = kv.keys[0].numel()
    spans = [rf"<static_cast<int64_t>\({n}L\)" for n in (elements, elements // 2, elements // 64)]
    assert codes and not any(re.search(span, code) for span in spans for code in codes)
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_paged_mask_through_compiled_flex_attention_reads_each_rows_own_columns():
    """The decode step's block mask (full blocks unmasked, a partly filled last block masked) through compiled
    FlexAttention on the CPU equals attention over each live row's own columns 0..pos-1; listing a partly filled
    block as full would let the row see columns it never wrote. Eager FlexAttention applies the mask everywhere and
    ignores the block lists, so only a compiled kernel tests them; the CPU's needs index lists as wide as the pool,
    so they are padded here (the GPU test file runs the engine's own)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers import LlamaConfig

    from model.engine.kv_cache import PagedKV, paged_block_mask

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    block, blocks, pos = 16, 10, [20, 5, 40, 0, 32]  # 1 full + 1 partial, 1 partial, 2 + 1, free, 2 full
    kv = PagedKV(config, 5, 3, blocks, torch.float32, torch.device("cpu"), "flex", block=block)
    g = torch.Generator().manual_seed(0)
    for pool in (kv.keys[0], kv.values[0]):
        pool.copy_(torch.randn(pool.shape, generator=g))
    for s, n in enumerate(pos):
        kv.book.grow(s, n)
    kv.sync()
    kv.pos.copy_(torch.tensor(pos))
    mask = paged_block_mask(kv.step_inputs(5, torch.tensor([True, True, True, False, True]))[0])
    assert mask.full_kv_num_blocks.flatten().tolist() == [1, 0, 2, 0, 2]
    assert mask.kv_num_blocks.flatten().tolist() == [1, 1, 1, 0, 0]

    def wide(partial, full):
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-1], blocks - t.shape[-1])], -1)  # noqa: E731
        return BlockMask.from_kv_blocks(
            partial, pad(mask.kv_indices), full, pad(mask.full_kv_indices), BLOCK_SIZE=block,
            mask_mod=mask.mask_mod, seq_lengths=(1, blocks * block), compute_q_blocks=False,
        )  # fmt: skip

    attend = torch.compile(lambda q, m: flex_attention(q, kv.keys[0], kv.values[0], block_mask=m), fullgraph=True)
    q = torch.randn(5, 2, 1, 32, generator=g)
    with torch.inference_mode():
        got = attend(q, wide(mask.kv_num_blocks, mask.full_kv_num_blocks))
        overread = mask.full_kv_num_blocks + mask.kv_num_blocks  # the partial blocks read as full
        wrong = attend(q, wide(torch.zeros_like(overread), overread))
    for s in (0, 1, 2, 4):
        held = kv.book.table[s, : kv.book.held[s]].long()
        columns = (held.unsqueeze(-1) * block + torch.arange(block)).flatten()[: pos[s]]
        expected = F.scaled_dot_product_attention(q[s : s + 1], kv.keys[0][:, :, columns], kv.values[0][:, :, columns])
        torch.testing.assert_close(got[s : s + 1], expected)
        assert (s == 4) == torch.allclose(wrong[s : s + 1], expected, atol=1e-4)  # row 4 had no partial block


@pytest.mark.slow
def test_the_compiled_packed_prefill_equals_the_eager_one_at_any_number_of_positions(monkeypatch):
    """The engine's packed prefill through its compiled layer as the engine builds it (`prefill_layer_for`: Inductor
    on the CPU, traced at the build with the positions symbolic) against the same prefill eager, on packs of 3, 2 and
    4 prompts of different lengths: the same logits at each prompt's last position and the same keys and values in
    the same pool positions (a compiled write to the wrong positions, rotary embeddings at packed instead of
    per-prompt columns, or the norm taken at the wrong rows would differ), with no second compilation for a new
    number of positions or prompts (a layer compiled with static shapes would compile again for each)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.engine import model_runner
    from model.engine.kv_cache import PagedKV, slot_attention_on
    from model.engine.model_runner import packed_prefill

    monkeypatch.setattr(model_runner, "COMPILE_PREFILL", True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=50
    )
    lm = LlamaForCausalLM(config).eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    built = PagedKV(config, 4, 4, 40, torch.float32, torch.device("cpu"), "sdpa", block=16)  # as the engine's pools
    with slot_attention_on(lm), torch.inference_mode():
        compiled = model_runner.prefill_layer_for(lm, built, True)
    for sizes in ([5, 9, 3], [30, 2], [4, 17, 6, 11]):
        caches = []
        for _ in range(2):
            kv = PagedKV(config, 4, 4, 40, torch.float32, torch.device("cpu"), "sdpa", block=16)
            for s, n in enumerate(sizes):
                assert kv.book.grow(s, n)
            kv.sync()
            caches.append(kv)
        index = caches[0].book.prefill_index(list(range(len(sizes))), sizes, max(sizes))
        embeds = torch.randn(len(sizes), max(sizes), 64)
        with slot_attention_on(lm), torch.inference_mode():
            eager = packed_prefill(lm, caches[0], embeds, index, sizes)
            got = packed_prefill(lm, caches[1], embeds, index, sizes, layer=compiled)
        torch.testing.assert_close(got, eager)
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
            torch.testing.assert_close(b, a)
        assert caches[1].keys[0].abs().sum() > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_the_prefill_layers_build_leaves_the_pool_zeroed(monkeypatch):
    """The compiled prefill's layer is traced while the engine is built, on two short prompts written at the pool's
    first positions (the scratch block). Every block must hold zeros afterwards: a row reads zeros or its own keys,
    never a leftover. With attention biases, zero embeddings give non-zero keys and values, so only the zeroing
    after the build leaves the pool clean. Dynamo alone (backend "eager") runs the trace."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.engine import model_runner
    from model.engine.kv_cache import PagedKV, slot_attention_on

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real(fn, **options, backend="eager"))
    monkeypatch.setattr(model_runner, "COMPILE_PREFILL", True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=50,
        attention_bias=True,
    )  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    for layer in lm.model.layers:
        torch.nn.init.normal_(layer.self_attn.k_proj.bias)
        torch.nn.init.normal_(layer.self_attn.v_proj.bias)
    kv = PagedKV(config, 4, 4, 40, torch.float32, torch.device("cpu"), "sdpa", block=16)
    torch._dynamo.reset()
    with slot_attention_on(lm), torch.inference_mode():
        model_runner.prefill_layer_for(lm, kv, True)
    assert all(not pool.any() for pool in kv.keys + kv.values)
    torch._dynamo.reset()
