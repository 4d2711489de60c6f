"""CUDA-only paths: the fast inference path must give the faithful path's greedy tokens (run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from model.config import GenerationConfig
from model.generate.base import generate_ids
from model.network.checkpoint import load_model
from model.network.deepresonance import Example

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
GREEDY = GenerationConfig(max_new_tokens=16, do_sample=False, decoder="generate")


@pytest.fixture(autouse=True)
def fresh_compiled_state():
    """Each test's compiled engines start from a clean Dynamo and CUDA-graph state, as in a process of its own (one
    `dr` command holds one engine; the benchmarks reset between engines)."""
    yield
    torch._dynamo.reset()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def rows() -> list[Example]:
    g = torch.Generator().manual_seed(1)
    return [
        Example("<Audio>", "Describe the music.", [("audio", torch.randn(3, 1, 128, 204, generator=g))]),
        Example(
            "Hi <Image> and <Audio>",
            "Which key?",
            [("image", torch.randn(3, 224, 224, generator=g)), ("audio", torch.randn(3, 1, 128, 204, generator=g))],
        ),
        Example("", "Tell me about jazz.", []),
    ]


def engine_ids(engine, examples: list[Example], gens: list[GenerationConfig]) -> list[list[int]]:
    """Each example's ids through `engine` (request i is example i), in the examples' order."""
    from model.engine.sequence import Request

    got = {}
    for ended in engine.run(Request(i, ex, g, i) for i, (ex, g) in enumerate(zip(examples, gens, strict=True))):
        got.update((u.handle, u.ids) for u in ended)
    return [got[i] for i in range(len(examples))]


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_fast_path_matches_faithful_path_in_float32(tiny_layout, variant):
    paths = (tiny_layout.vicuna, tiny_layout.delta_dir(variant), tiny_layout.imagebind)
    faithful = load_model(*paths, device="cuda", attn_implementation="eager")
    expected = [generate_ids(faithful, [row], GREEDY)[0] for row in rows()]  # one row at a time, LoRA unmerged
    fast = load_model(*paths, device="cuda", attn_implementation="sdpa")
    fast.merge_lora()
    assert generate_ids(fast, rows(), GREEDY) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_loaded_onto_the_card_holds_what_a_host_load_moved_there_holds(tiny_layout, dtype):
    """load_model sends the LLaMA weights to the card while ImageBind is read, and ImageBind straight to the card:
    every tensor, buffers (the rotary frequencies) included, is bitwise what a load on the host moved after gives."""
    paths = (tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)

    def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:  # buffers too: inv_freq is not in a state dict
        return dict(model.named_parameters()) | dict(model.named_buffers())

    expected = tensors(load_model(*paths, device="cpu", dtype=dtype).to("cuda"))
    got = tensors(load_model(*paths, device="cuda", dtype=dtype))
    assert list(got) == list(expected)
    for name, tensor in got.items():
        assert tensor.device.type == "cuda" and tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_from_the_early_read_holds_what_a_host_load_moved_there_holds(tiny_layout, dtype, monkeypatch):
    """The LLaMA and ImageBind weights read onto the card early (model/io/early_read.py; the LLaMA in pieces smaller
    than a tensor so the two pinned buffers take turns), then the model built around them: every tensor, buffers
    included, on the card and bitwise what a load on the host moved after gives; the model holds the reads' own
    tensors, not copies."""
    from model.io import early_read
    from model.io.early_read import EarlyRead
    from model.media.encoder import kept_weight

    monkeypatch.setattr(early_read, "CHUNK", 4096)
    paths = (tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)

    def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters()) | dict(model.named_buffers())

    expected = tensors(load_model(*paths, device="cpu", dtype=dtype).to("cuda"))
    reads = [
        EarlyRead(tiny_layout.vicuna, "cuda", dtype),
        EarlyRead(tiny_layout.imagebind, "cuda", dtype, keep=kept_weight),
    ]
    read_at = set()
    for read in reads:
        read.take = lambda taken=read.take: (
            (state := taken()) and (read_at.update(t.data_ptr() for t in state.values()) or state)
        )
    got = tensors(load_model(*paths, device="cuda", dtype=dtype, early=reads))
    assert all(read.failed is None for read in reads) and read_at
    assert list(got) == list(expected)
    for name, tensor in got.items():
        assert tensor.device.type == "cuda" and tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
    assert got["visual_encoder.imagebind.modality_trunks.audio.blocks.0.attn.in_proj_weight"].data_ptr() in read_at
    if dtype == torch.float32:  # the file's dtype: the layers' weights are the very tensors read
        assert got["llama_model.base_model.model.model.layers.0.mlp.up_proj.weight"].data_ptr() in read_at


def test_bfloat16_fast_path_tracks_float32_logits(tiny_layout):
    """bf16 keeps 8 mantissa bits, so near-tied logits of a random tiny model can flip tokens; the tolerance is on
    the logits instead: within 2% of their range."""
    paths = (tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)
    ref = load_model(*paths, device="cuda")
    fast = load_model(*paths, device="cuda", dtype=torch.bfloat16)
    fast.merge_lora()
    with torch.inference_mode():
        a, b = ref.prepare(rows(), left_pad=True), fast.prepare(rows(), left_pad=True)
        la = ref.llama_model(inputs_embeds=a.embeds, attention_mask=a.attention_mask).logits[:, -1]
        lb = fast.llama_model(inputs_embeds=b.embeds, attention_mask=b.attention_mask).logits[:, -1].float()
    span = la.max() - la.min()
    assert (la - lb).abs().max() < 0.02 * span


def test_compiled_static_loop_matches_generate(tiny_layout):
    from dataclasses import replace

    paths = (tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)
    model = load_model(*paths, device="cuda")
    model.merge_lora()
    expected = generate_ids(model, rows(), GREEDY)
    static = replace(GREEDY, decoder="static")  # on CUDA: one compiled step with CUDA graphs
    assert generate_ids(model, rows(), static) == expected
    assert generate_ids(model, rows(), static) == expected  # the cached compiled step, reused


def test_compiled_static_loop_matches_generate_at_three_batch_shapes(tiny_layout):
    """Batches of 1, 2 and 3 rows (1, 2 and 4 after power-of-two padding) in one process: a third shape is where
    torch.compile's automatic dynamic shapes would compile a symbolic-batch graph; each batch equals `generate`."""
    from dataclasses import replace

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind, device="cuda")
    model.merge_lora()
    static = replace(GREEDY, decoder="static")
    for n in (1, 2, 3):
        assert generate_ids(model, rows()[:n], static) == generate_ids(model, rows()[:n], GREEDY), n


def test_job_with_compiled_static_loop_equals_generate_job(tiny_layout, tmp_path):
    """A whole `run_inference` job on CUDA, several batches, the next batch's media encoded in a background thread
    while the compiled loop replays its CUDA graphs: the answers equal a `generate` job's."""
    from synth import make_row, write_dataset, write_wav

    from model.data.catalog import load_rows
    from model.infer.job import run_inference
    from model.infer.journal import read_journal

    for i in range(5):
        write_wav(tmp_path / "data" / f"a{i}.wav", 1.0 + i, 220.0 * (i + 1))
    rows = [make_row(f"r{i}", [("audio", f"a{i % 5}.wav")], instruction=f"Question {i % 3}?") for i in range(11)]
    rows, _ = load_rows(write_dataset(tmp_path / "data", rows))
    paths = (tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)
    model = load_model(*paths, device="cuda")
    model.merge_lora()
    answers = []
    for decoder in ("generate", "static"):
        out = tmp_path / decoder / "r.json"
        gen = GenerationConfig(max_new_tokens=16, do_sample=False, decoder=decoder)
        assert run_inference(model, rows, tmp_path / "data", out, gen, batch_size=4).answered == 11
        answers.append(read_journal([out.with_suffix(".jsonl")]))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("kernel", ["flex", "sdpa"])
def test_compiled_engine_matches_generate_while_slots_refill(tiny_layout, kernel, step_widths):
    """The engine compiled with CUDA graphs (the default on CUDA), fewer slots than rows and different
    max_new_tokens, so slots refill while others decode, and the last rows move to the front slots and decode at
    width 2 (a second graph): each row's ids equal one-row `generate` in fp32."""
    from dataclasses import replace

    from model.engine.scheduler import Engine
    from model.engine.sizing import cache_length

    paths = (tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)
    model = load_model(*paths, device="cuda")
    model.merge_lora()
    examples = rows() * 3
    gens = [replace(GREEDY, max_new_tokens=n) for n in (16, 3, 9, 12, 1, 16, 5, 7, 16)]
    expected = [generate_ids(model, [ex], g)[0] for ex, g in zip(examples, gens, strict=True)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 16)
    engine = Engine(model, 4, length, 16, k_cap=1, kernel=kernel, sync_every=3, refill_min=1, narrow=(2,))
    assert engine_ids(engine, examples, gens) == expected
    assert set(step_widths) == {4, 2} and set(engine.step.graphs) == {4, 2}


def test_engine_prefill_queues_behind_the_steps_without_waiting(tiny_layout):
    """The engine's refill (prompt assembly, encoder features to the device, prefill, first tokens) and its move of the
    last rows to the front slots make no call that waits for the device (CUDA's sync debug mode raises on one), so
    their launches queue behind the decode steps;
    answers equal one-row `generate`. A second identical job runs under the check (the first recorded the step's
    and the small prefills' CUDA graphs, which synchronizes)."""
    from dataclasses import replace

    from model.engine.scheduler import Engine
    from model.engine.sizing import cache_length

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind, device="cuda")
    model.merge_lora()
    g = torch.Generator().manual_seed(2)
    examples = [
        Example("<Audio>", f"Question {i}?", [("audio", torch.randn(3, model.llama_proj.in_features, generator=g))])
        if i % 2
        else Example("", f"Tell me about piece {i}.", [])
        for i in range(24)
    ]
    gens = [replace(GREEDY, max_new_tokens=n) for n in ([16, 3, 9, 12, 1, 5] * 4)]
    expected = [generate_ids(model, [ex], gen)[0] for ex, gen in zip(examples, gens, strict=True)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 16)
    engine = Engine(model, 10, length, 16, k_cap=1, sync_every=2, refill_min=1, narrow=(4,))

    def checked(work):
        def run():
            torch.cuda.set_sync_debug_mode("error")
            try:
                return work()
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    for job in range(2):
        if job:
            engine._refill, engine._gather = checked(engine._refill), checked(engine._gather)
        assert engine_ids(engine, examples, gens) == expected


@pytest.mark.parametrize("graph_prefill", [False, True])
def test_engines_come_and_go_in_one_process(tiny_layout, graph_prefill):
    """Engines whose small prefills replay CUDA graphs, one after another in one process: different slot counts (so
    the compiled step is traced and captured anew each time), a one-slot engine right after a larger one is freed.
    Every engine's answers equal one-row `generate`. Before the step was compiled with static shapes only, the third
    slot count got a symbolic-slot step from automatic dynamic shapes: wrong answers without graph prefills
    (benchmarks/results/2026-12-02-h200-engine-run5-prefill-graphs/engine_sequence_wrong_answers_h200.log),
    an illegal memory access with them
    (benchmarks/results/2026-12-02-h200-engine-run5-prefill-graphs/engine_dynamic_recompile_crash_h200.log)."""
    import gc
    from dataclasses import replace

    from model.engine.scheduler import Engine
    from model.engine.sizing import cache_length

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind, device="cuda")
    model.merge_lora()
    examples = rows() * 2
    gens = [replace(GREEDY, max_new_tokens=n) for n in (16, 3, 9, 12, 1, 5)]
    expected = [generate_ids(model, [ex], g)[0] for ex, g in zip(examples, gens, strict=True)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 16)
    for slots in (4, 1, 3, 1):
        engine = Engine(model, slots, length, 16, k_cap=1, sync_every=3, refill_min=1, graph_prefill=graph_prefill)
        got = engine_ids(engine, examples, gens)
        torch.cuda.synchronize()
        if graph_prefill:
            assert engine.graphs.shapes and all(e.graph for e in engine.graphs.shapes.values()), "no graph replayed"
        assert got == expected, slots
        del engine
        gc.collect()


def test_engine_job_equals_generate_job(tiny_layout, tmp_path):
    """A whole `run_inference` job on CUDA with the default decoder (the compiled engine) equals a `generate` job."""
    from synth import make_row, write_dataset, write_wav

    from model.data.catalog import load_rows
    from model.infer.job import run_inference
    from model.infer.journal import read_journal

    for i in range(5):
        write_wav(tmp_path / "data" / f"a{i}.wav", 1.0 + i, 220.0 * (i + 1))
    rows = [make_row(f"r{i}", [("audio", f"a{i % 5}.wav")], instruction=f"Question {i % 3}?") for i in range(11)]
    rows, _ = load_rows(write_dataset(tmp_path / "data", rows))
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind, device="cuda")
    model.merge_lora()
    answers = []
    for decoder in ("generate", "engine"):
        out = tmp_path / decoder / "r.json"
        gen = GenerationConfig(max_new_tokens=16, do_sample=False, decoder=decoder)
        assert run_inference(model, rows, tmp_path / "data", out, gen, batch_size=4).answered == 11
        answers.append(read_journal([out.with_suffix(".jsonl")]))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("priority", [0, -1])
def test_a_jobs_media_load_on_a_stream_of_their_own(tiny_layout, tmp_path, monkeypatch, priority):
    """The job's loader encodes on its own CUDA stream, not between the engine's steps on the default one, at
    LOADER_PRIORITY (-1: above the default stream's)."""
    from synth import make_row, write_dataset, write_wav

    import model.infer.job as inference
    from model.data.catalog import load_rows

    write_wav(tmp_path / "data" / "a.wav", 1.0, 220.0)
    rows, _ = load_rows(write_dataset(tmp_path / "data", [make_row(f"r{i}", [("audio", "a.wav")]) for i in range(3)]))
    streams = []
    real_encode_media = inference.encode_media

    def encode_media(model, *args, **kwargs):
        streams.append(torch.cuda.current_stream(model.device))
        return real_encode_media(model, *args, **kwargs)

    monkeypatch.setattr(inference, "encode_media", encode_media)
    monkeypatch.setattr(inference, "LOADER_PRIORITY", priority)
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind, device="cuda")
    gen = GenerationConfig(max_new_tokens=4, do_sample=False)
    assert inference.run_inference(model, rows, tmp_path / "data", tmp_path / "r.json", gen, 2).answered == 3
    default = torch.cuda.default_stream(model.device)
    assert len(streams) == 2 and all(s != default for s in streams)
    assert all((s.priority < default.priority) == (priority < 0) for s in streams)


@pytest.mark.parametrize("kernel", ["flex", "sdpa"])
def test_compiled_paged_engine_grows_rows_across_blocks_and_preempts(tiny_layout, kernel):
    """The compiled engine with a pool of 384 positions for 4 slots: rows of up to 200 tokens grow across blocks as
    they decode, the pool runs short, the youngest rows are preempted and decoded again. Each row's ids equal one-row
    `generate` in fp32, and every block is back in the pool at the end."""
    from dataclasses import replace

    from model.engine.kv_cache import BLOCK
    from model.engine.scheduler import Engine
    from model.engine.sizing import cache_length

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind, device="cuda")
    model.merge_lora()
    examples = rows() * 3
    gens = [replace(GREEDY, max_new_tokens=n) for n in (200, 30, 150, 120, 1, 200, 90, 170, 60)]
    expected = [generate_ids(model, [ex], g)[0] for ex, g in zip(examples, gens, strict=True)]
    length = cache_length(max(model.example_length(ex) for ex in examples), 200)
    blocks = 384 // BLOCK
    engine = Engine(
        model, 4, length, 200, k_cap=1, kernel=kernel, sync_every=3, refill_min=1, narrow=(2,), blocks=blocks
    )
    assert engine_ids(engine, examples, gens) == expected
    assert engine.preempted > 0 and engine.book.available == blocks - 1  # all but the scratch block


def test_a_pools_budget_is_the_same_whatever_the_process_holds_within_reason():
    """A pool is a shape of the compiled step: 2 GiB freed but cached by the allocator, then 1 GiB still held, must
    leave the budget as it was (two jobs of one H200 process had pools a block step apart, and the second compiled
    its step anew)."""
    from types import SimpleNamespace

    from model.engine.sizing import memory_budget

    model = SimpleNamespace(
        llama_model=SimpleNamespace(device=torch.device("cuda")), parameters=lambda: [], buffers=lambda: []
    )
    before = memory_budget(model)
    held = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    del held
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= 2 << 30  # cached, not given back
    assert memory_budget(model) == before
    kept = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    assert memory_budget(model) == before
    del kept


def test_packed_prefill_attention_in_half_precision_equals_the_masked_reference():
    """The engine's packed prefill (prompts end to end, no padding) attends in bf16 through torch's variable-length
    flash attention; each prompt's output equals causal SDPA over that prompt alone, and a query never sees another
    prompt (a key of another row set huge would pull its output away)."""
    import torch.nn.functional as F

    from model.engine.kv_cache import packed_attention, varlen_attn

    assert varlen_attn is not None, "this torch has no torch.nn.attention.varlen: the packed prefill falls back"
    g = torch.Generator(device="cuda").manual_seed(3)
    sizes = [5, 130, 1, 77, 260]
    starts = torch.tensor([0, 5, 135, 136, 213, 473], device="cuda")
    q, k, v = (torch.randn(473, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    v[135] = 1e4  # row 2's only value: rows 1 and 3 beside it must not see it
    out = packed_attention(q, k, v, starts, max(sizes), 64**-0.5)
    for r, n in enumerate(sizes):
        a, b = starts[r].item(), starts[r].item() + n
        alone = F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True)
        torch.testing.assert_close(out[a:b], alone.transpose(0, 1), atol=2e-2, rtol=2e-2)


def test_compiled_packed_prefill_in_half_precision_tracks_the_eager_one():
    """The engine's packed prefill through its compiled layer in bf16 (variable-length flash attention inside the
    compiled graph, positions symbolic) against the same prefill eager: each prompt's next-token logits and its keys
    and values in the pool agree to bf16 rounding, and packs of other sizes reuse the one compiled layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.engine.kv_cache import BLOCK, PagedKV, slot_attention_on
    from model.engine.model_runner import packed_prefill, prefill_layer

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512, vocab_size=300
    )
    lm = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(prefill_layer, fullgraph=True, dynamic=True)
    for sizes in ([5, 130, 77, 260, 9, 3, 40, 12, 66], [300, 2, 17, 90, 45, 8, 33, 150, 21, 7]):
        caches = []
        for _ in range(2):
            kv = PagedKV(config, 16, -(-max(sizes) // BLOCK), 128, torch.bfloat16, torch.device("cuda"), "flex")
            for s, n in enumerate(sizes):
                assert kv.book.grow(s, n)
            kv.sync()
            caches.append(kv)
        index = caches[0].book.prefill_index(list(range(len(sizes))), sizes, max(sizes))
        embeds = torch.randn(len(sizes), max(sizes), 256, device="cuda", dtype=torch.bfloat16)
        with slot_attention_on(lm), torch.inference_mode():
            eager = packed_prefill(lm, caches[0], embeds, index, sizes)
            got = packed_prefill(lm, caches[1], embeds, index, sizes, layer=compiled)
        torch.testing.assert_close(got.float(), eager.float(), atol=5e-2, rtol=5e-2)
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
            torch.testing.assert_close(b.float(), a.float(), atol=5e-2, rtol=5e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_encoders_fast_paths_on_the_gpu_equal_stock_imagebind(tiny_layout, monkeypatch):
    """On CUDA the vision stem runs as a matrix product instead of cuDNN's Conv3d and the trunks batch-first through
    scaled_dot_product_attention on strided views (the audio tower's learned key and value included): same features
    as the stock model."""
    from model.config import IMAGEBIND_TINY
    from model.media.encoder import MediaEncoder, imagebind_model_module

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the stock convolution in full fp32 too
    encoder = MediaEncoder.load(tiny_layout.imagebind).cuda()
    stock = imagebind_model_module().ImageBindModel(**IMAGEBIND_TINY).eval()
    stock.load_state_dict(torch.load(tiny_layout.imagebind, weights_only=True))
    stock.cuda()
    video, image = torch.randn(2, 15, 3, 2, 224, 224).cuda(), torch.randn(3, 3, 224, 224).cuda()
    audio = torch.randn(2, 3, 1, 128, 204).cuda()
    close = {"rtol": 1e-4, "atol": 1e-5}  # kernels that sum in another order, in fp32
    with torch.no_grad():
        torch.testing.assert_close(encoder("video", video).mean(dim=1), stock({"vision": video})["vision"], **close)
        torch.testing.assert_close(encoder("image", image)[:, 0], stock({"vision": image})["vision"], **close)
        # stock audio: the mean over clips of unit-norm embeddings times a fixed logit scale of 20
        torch.testing.assert_close(encoder("audio", audio).mean(dim=1) * 20, stock({"audio": audio})["audio"], **close)


def test_encoder_calls_queued_one_ahead_on_a_side_stream_equal_a_call_per_file(tiny_layout, tmp_path):
    """`encode_files` on a stream of its own, as a job's loader runs it: each call queued before the one before it is
    read back through pinned memory and an event (model/media/features.py `Queued`), each file's features those of
    the encoder's checked call on that file alone."""
    from synth import write_wav

    from model.media.decoders import load_or_error
    from model.media.encoder import MediaEncoder
    from model.media.encoding import encode_files

    encoder = MediaEncoder.load(tiny_layout.imagebind).cuda()
    files = [write_wav(tmp_path / f"a{i}.wav", 1.0, 200.0 + 50 * i) for i in range(5)]
    with torch.cuda.stream(torch.cuda.Stream()):
        got = encode_files(encoder, None, "audio", files, batch_size=2)
    for path, features in zip(files, got, strict=True):
        alone = encoder("audio", load_or_error("audio", path)[None].cuda())[0].cpu()
        torch.testing.assert_close(features, alone, rtol=1e-4, atol=1e-5)  # a batch of 2 against 1, in fp32


def test_inputs_rounded_to_bfloat16_on_the_host_equal_those_rounded_on_the_gpu(tmp_path):
    """The decoding processes send a GPU job's inputs in its encoder's bfloat16 (model/media/decoders.py
    `find_chunk`): the host's rounding must be the device's, or the features would change with the path."""
    from synth import write_image, write_video, write_wav

    from model.media.decoders import load_or_error

    inputs = [
        load_or_error("audio", write_wav(tmp_path / "a.wav", 2.0, 330.0)),
        load_or_error("image", write_image(tmp_path / "i.png", size=(300, 200))),
        load_or_error("video", write_video(tmp_path / "v.mp4", 1.0)),
        torch.randn(1 << 20) * torch.logspace(-30, 30, 1 << 20),  # every exponent
        torch.cat([1 + torch.arange(1, 512, 2) * 2**-8, -3 - torch.arange(1, 512, 2) * 2**-7]),  # halfway: to even
    ]
    for x in inputs:
        assert torch.equal(x.to(torch.bfloat16).cuda(), x.cuda().to(torch.bfloat16))


def test_a_second_process_loads_the_compiled_engine_and_decodes_the_same(tiny_root, tmp_path):
    """model/engine/compile_cache.py on a GPU: the second process's engine (its step captured as CUDA graphs from the
    loaded forms) traces nothing and decodes the first process's ids."""
    from tests.test_compile_cache import two_engine_processes

    two_engine_processes(tiny_root, tmp_path, "cuda")
