"""The composed model: loading base + delta, batched generation, delta format, dtypes, encoder outputs."""

from __future__ import annotations

import io
import shutil
import threading

import pytest
import torch

from model.config import IMAGEBIND_TINY, GenerationConfig
from model.generate.base import generate, generate_ids
from model.io.transfer import converted, moved_while
from model.media.encoder import BatchFirstAttention, MediaEncoder, PatchProjection, imagebind_model_module
from model.network.checkpoint import DeltaError, delta_state, load_model, read_delta, save_delta
from model.network.deepresonance import Example

GREEDY = GenerationConfig(max_new_tokens=10, do_sample=False, decoder="generate")  # the faithful reference


def examples() -> list[Example]:
    g = torch.Generator().manual_seed(0)
    audio = lambda: torch.randn(3, 1, 128, 204, generator=g)  # noqa: E731
    image = torch.randn(3, 224, 224, generator=g)
    return [
        Example("<Audio>", "Describe the music.", [("audio", audio())]),
        Example(
            "Listen to this: <Image> and <Audio>",
            "What is the key of this song?",
            [("image", image), ("audio", audio())],
        ),
        Example("", "Hi", []),
        Example("<Video>", "What happens?", [("video", torch.randn(15, 3, 2, 224, 224, generator=g))]),
    ]


@pytest.fixture(scope="module", params=["alpha", "beta"])
def model(request, tiny_layout):
    return load_model(tiny_layout.vicuna, tiny_layout.delta_dir(request.param), tiny_layout.imagebind)


def test_loads_variant_shapes_and_weights_from_delta(model, tiny_layout):
    """Every tensor of the delta file (read here with torch.load, as the original saved it) is the loaded model's,
    the LoRA rank is the saved lora_A's, and the LoRA B and projector differ from a model built without the delta
    (fresh LoRA B is zero), so a delta that is ignored, or only partly copied, fails."""
    saved = torch.load(tiny_layout.delta_dir(model.config.variant) / "pytorch_model.pt", weights_only=True)
    own = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(own[key], value), key
    lora_a = saved["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert model.config.lora_r == lora_a.shape[0]
    fresh = load_model(tiny_layout.vicuna, None, tiny_layout.imagebind, variant=model.config.variant).state_dict()
    lora_b = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    assert not fresh[lora_b].any() and saved[lora_b].any()
    assert not torch.equal(fresh["llama_proj.weight"], saved["llama_proj.weight"])
    assert (model.preencoding is not None) == (model.config.variant == "beta")
    if model.preencoding is not None:
        assert len(model.preencoding.layers) == 1 + max(
            int(k.split(".")[2]) for k in saved if k.startswith("preencoding.layers.")
        )
    assert model.embed_tokens.weight.shape[0] == len(model.tokenizer)


@pytest.mark.parametrize("decoder", ["generate", "engine", "static"])
def test_batched_greedy_equals_one_row_at_a_time(model, decoder):
    from dataclasses import replace

    rows = examples()
    batched = generate_ids(model, rows, replace(GREEDY, decoder=decoder))
    single = [generate_ids(model, [row], GREEDY)[0] for row in rows]
    assert batched == single
    assert all(len(ids) > 0 for ids in batched)


def naive_greedy_answer(model, example: Example, max_new_tokens: int) -> str:
    """The answer derived without any of dr's decoders: the whole sequence recomputed for every token (no cache, no
    padding), argmax, stop at EOS or the original's stop id 835 ("▁###"), decode, keep the text before "\\n###"."""
    tok = model.tokenizer
    embeds = model.prepare([example]).embeds
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.llama_model(inputs_embeds=embeds).logits[0, -1]
            token = int(logits.argmax())
            if token == tok.eos_id:
                break
            ids.append(token)
            if token == tok.stop_id:
                break
            embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[token]], device=embeds.device))], dim=1)
    return tok.decode(ids).split("\n###")[0]


@pytest.mark.parametrize("decoder", ["generate", "engine", "static"])
def test_answers_a_batch_of_rows(model, decoder):
    """Every decoder's batched answers are the text a naive one-row greedy loop derives, row by row."""
    from dataclasses import replace

    answers = generate(model, examples(), replace(GREEDY, decoder=decoder))
    assert answers == [naive_greedy_answer(model, ex, GREEDY.max_new_tokens) for ex in examples()]
    assert any(answers)  # a model that answered nothing at all would pass the comparison trivially


def test_sampling_is_reproducible_with_a_seed(model):
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, seed=3)
    first = generate_ids(model, examples()[:2], gen)
    assert generate_ids(model, examples()[:2], gen) == first
    other = generate_ids(model, examples()[:2], GenerationConfig(max_new_tokens=10, temperature=1.0, seed=4))
    assert other != first


def test_delta_round_trip_keeps_original_key_names(model, tmp_path, tiny_layout):
    save_delta(model, tmp_path)
    raw = torch.load(tmp_path / "pytorch_model.pt", weights_only=True)
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in raw
    assert "llama_model.base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight" in raw
    assert raw["llama_model.base_model.model.model.embed_tokens.weight"].shape[0] == len(model.tokenizer)
    assert "llama_model.base_model.model.lm_head.weight" in raw and "llama_proj.bias" in raw
    assert any(k.startswith("preencoding.layers.0.self_attn.in_proj_weight") for k in raw) == (
        model.config.variant == "beta"
    )
    assert not any(k.startswith("visual_encoder") for k in raw)
    again = load_model(tiny_layout.vicuna, tmp_path, tiny_layout.imagebind)
    for key, value in delta_state(model).items():
        assert torch.equal(delta_state(again)[key], value), key
    assert read_delta(tmp_path).keys() == raw.keys()


def test_merged_lora_gives_the_same_greedy_tokens(tiny_layout):
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    before = generate_ids(model, examples(), GREEDY)
    model.merge_lora()
    assert generate_ids(model, examples(), GREEDY) == before


def corrupt_copy(tiny_layout, tmp_path, edit):
    folder = tmp_path / "delta"
    shutil.copytree(tiny_layout.delta_dir("beta"), folder)
    (folder / "delta.safetensors").unlink()
    state = torch.load(folder / "pytorch_model.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "pytorch_model.pt")
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("llama_proj.bias"), "missing key 'llama_proj.bias'"),
        (
            lambda s: s.pop("llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"),
            "missing key 'llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight'",
        ),
        (lambda s: s.__setitem__("llama_proj.weight", torch.zeros(3, 3)), "'llama_proj.weight' has shape \\(3, 3\\)"),
        (
            lambda s: s.__setitem__("gen_text_hidden_fcs.0.weight", torch.zeros(1)),
            "unexpected key 'gen_text_hidden_fcs",
        ),
    ],
)
def test_bad_delta_is_rejected_naming_the_key(tiny_layout, tmp_path, edit, message):
    folder = corrupt_copy(tiny_layout, tmp_path, edit)
    with pytest.raises(DeltaError, match=message):
        load_model(tiny_layout.vicuna, folder, tiny_layout.imagebind)


def test_wrong_variant_and_unreadable_delta(tiny_layout, tmp_path):
    with pytest.raises(DeltaError, match="holds a beta delta, not alpha"):
        load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind, variant="alpha")
    (tmp_path / "pytorch_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DeltaError, match="pytorch_model.pt: damaged or not a torch file"):
        load_model(tiny_layout.vicuna, tmp_path, tiny_layout.imagebind)
    with pytest.raises(DeltaError, match="no pytorch_model.pt"):
        load_model(tiny_layout.vicuna, tmp_path / "missing", tiny_layout.imagebind)


def test_lora_rank_and_fusion_depth_come_from_the_delta(tiny_layout, tmp_path):
    from transformers import LlamaForCausalLM

    from model.config import ModelConfig
    from model.network.checkpoint import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    config = ModelConfig(variant="beta", encoder_size="tiny", lora_r=8, fusion_layers=2)
    tok = PromptTokenizer.from_dir(tiny_layout.delta_dir("beta"))
    model = DeepResonance(config, LlamaForCausalLM.from_pretrained(tiny_layout.vicuna), tok, None, 32)
    save_delta(model, tmp_path)
    (tmp_path / "dr_config.json").unlink()  # the original's folders have no such file
    loaded = load_model(tiny_layout.vicuna, tmp_path, tiny_layout.imagebind)
    assert loaded.config.lora_r == 8 and len(loaded.preencoding.layers) == 2


def test_stage1_delta_with_legacy_names_loads(tiny_layout, tmp_path):
    state = {k: v for k, v in read_delta(tiny_layout.delta_dir("alpha")).items() if "lora_" not in k}
    legacy = {k.replace("llama_model.base_model.model.", "llama_model."): v for k, v in state.items()}
    torch.save(legacy, tmp_path / "pytorch_model.pt")
    model = load_model(tiny_layout.vicuna, tmp_path, tiny_layout.imagebind)
    assert torch.equal(model.llama_proj.weight, state["llama_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_paths_run_and_track_float32(tiny_layout, dtype):
    rows = examples()[:2]
    ref = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)
    low = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind, dtype=dtype)
    assert low.dtype == dtype and low.visual_encoder.dtype == dtype
    with torch.no_grad():
        a, b = ref.prepare(rows), low.prepare(rows)
        la = ref.llama_model(inputs_embeds=a.embeds, attention_mask=a.attention_mask).logits
        lb = low.llama_model(inputs_embeds=b.embeds, attention_mask=b.attention_mask).logits
    assert torch.isfinite(lb).all()
    assert (la - lb.float()).abs().max() < 0.1 * la.abs().max()
    assert len(generate_ids(low, rows, GREEDY)) == 2


def test_encoder_matches_stock_imagebind(tiny_layout):
    encoder = MediaEncoder.load(tiny_layout.imagebind)
    assert encoder.size == "tiny"
    stock = imagebind_model_module().ImageBindModel(**IMAGEBIND_TINY).eval()
    stock.load_state_dict(torch.load(tiny_layout.imagebind, weights_only=True))
    audio, video = torch.randn(2, 3, 1, 128, 204), torch.randn(1, 15, 3, 2, 224, 224)
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = stock({"audio": audio})["audio"]
        clips = encoder("audio", audio)
        assert clips.shape == (2, 3, 32)
        torch.testing.assert_close(clips.norm(dim=-1), torch.ones(2, 3))
        # stock audio = mean over clips of normalised embeddings times a fixed logit scale of 20
        torch.testing.assert_close(encoder("audio", audio).mean(dim=1) * 20, ref)
        torch.testing.assert_close(encoder("video", video).mean(dim=1), stock({"vision": video})["vision"])
        torch.testing.assert_close(encoder("image", image)[:, 0], stock({"vision": image})["vision"])


@pytest.mark.parametrize("bias", [False, True])
def test_patch_projection_is_the_convolution(bias):
    """The vision stem's matrix product equals torch's own Conv3d (a partial patch at the edges dropped, as a
    convolution's floor does), over the Conv3d's own parameters."""
    conv = torch.nn.Conv3d(3, 8, (2, 14, 14), stride=(2, 14, 14), bias=bias)
    stem = PatchProjection.replacing(conv)
    assert stem.weight is conv.weight and stem.bias is conv.bias
    x = torch.randn(2, 3, 5, 30, 43)  # 2 frames, 2 x 3 patches, and a remainder on every axis
    want = torch.nn.functional.conv3d(x, conv.weight, conv.bias, conv.stride)
    assert want.shape == (2, 8, 2, 2, 3)
    torch.testing.assert_close(stem.patch_product(x), want)
    assert not PatchProjection.applies_to(torch.nn.Conv3d(3, 8, (2, 14, 14), stride=(2, 7, 7)))
    assert not PatchProjection.applies_to(torch.nn.Conv2d(3, 8, 14, stride=14))


@pytest.mark.parametrize("add_bias_kv", [False, True])
def test_batch_first_attention_is_the_stock_module_on_the_other_layout(add_bias_kv):
    """nn.MultiheadAttention over [positions, batch, width] (ImageBind's call: the input as query, key and value, no
    mask) against BatchFirstAttention over the same parameters and the same input transposed."""
    torch.manual_seed(0)
    stock = torch.nn.MultiheadAttention(24, 4, add_bias_kv=add_bias_kv).eval()
    if add_bias_kv:
        assert stock.bias_k.abs().sum() > 0  # a learned position that changes the answer
    attention = BatchFirstAttention.replacing(stock)
    assert attention.in_proj_weight is stock.in_proj_weight and attention.out_proj is stock.out_proj
    x = torch.randn(7, 3, 24)
    with torch.no_grad():
        want = stock(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(attention(x.transpose(0, 1)), want.transpose(0, 1))
    with pytest.raises(ValueError, match="not ImageBind's self-attention"):
        BatchFirstAttention.replacing(torch.nn.MultiheadAttention(24, 4, batch_first=True))


def test_encoder_uses_the_patch_projection_and_batch_first_trunks_under_imagebinds_keys():
    encoder = MediaEncoder("tiny")
    stems = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert stems and all(isinstance(m, PatchProjection) for m in stems)
    for key in ("audio", "vision"):
        assert all(isinstance(b.attn, BatchFirstAttention) for b in encoder.imagebind.modality_trunks[key].blocks)
    stock = imagebind_model_module().ImageBindModel(**IMAGEBIND_TINY)
    assert set(encoder.imagebind.state_dict()) == set(stock.state_dict())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["files-dtype", "bfloat16"])
def test_a_loaded_encoder_holds_the_files_weights_in_its_own_memory(tiny_layout, tmp_path, dtype):
    """MediaEncoder.load builds no random weights (its parameters start on the meta device) and takes the file's:
    every kept tensor equals the file's (its floating ones cast to the dtype asked for, as `.to` would), none is left
    on the meta device or requires grad, and none is still read from the file's mapping: the file rewritten in place
    afterwards (other values, same layout) leaves them as loaded."""
    stored = torch.load(tiny_layout.imagebind, weights_only=True)

    def saved(state: dict) -> bytes:  # one writer for both files: the same layout, the values apart
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    path = tmp_path / "imagebind.pth"
    path.write_bytes(saved(stored))
    encoder = MediaEncoder.load(path, dtype=dtype)
    expected = {k: v.to(dtype) if dtype and v.is_floating_point() else v.clone() for k, v in stored.items()}
    for v in stored.values():
        if v.is_floating_point():
            v.add_(1)  # in place: the storages (some shared) stay as they were, so the file keeps its layout
    rewritten = saved(stored)
    assert len(rewritten) == path.stat().st_size
    with open(path, "r+b") as file:  # in place: the same inode, as a mapping of it sees
        file.write(rewritten)
    kept = encoder.imagebind.state_dict()
    assert kept and set(kept) <= set(expected)
    for name, tensor in kept.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert not any(t.is_meta for t in (*encoder.parameters(), *encoder.buffers()))
    assert not any(p.requires_grad for p in encoder.parameters())


class MovingLlm(torch.nn.Module):
    """A stand-in for the LLaMA model whose move to a device waits for `release`, or raises `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.started, self.release, self.error = threading.Event(), threading.Event(), error

    def _apply(self, fn, recurse=True):
        self.started.set()
        if self.error is not None:
            raise self.error
        assert self.release.wait(10), "the move waited for work that never ran beside it"
        return super()._apply(fn, recurse)


def test_the_llm_moves_to_the_device_while_imagebind_loads():
    """moved_while's move and its work run at once: the move waits for the work and the work for the move, so one
    after the other (either order) would stall until a wait gives up."""
    llm = MovingLlm()

    def work() -> str:
        assert llm.started.wait(10), "the work ran before the move began"
        llm.release.set()
        return "encoder"

    assert moved_while(llm, "meta", work) == "encoder"
    assert llm.weight.device.type == "meta" and isinstance(llm.weight, torch.nn.Parameter)


def test_a_modules_tensors_are_converted_at_once_each_once_through_its_own_apply():
    """`converted` runs the conversion on several tensors at the same time (each of three waits at a barrier for the
    other two: one after the other would break it), converts a tensor two modules share once and keeps it shared,
    and installs the results through the module's _apply, as Module.to does."""

    class Counted(torch.nn.ModuleDict):
        def _apply(self, fn, recurse=True):
            applied.append(fn)
            return super()._apply(fn, recurse)

    shared, applied = torch.nn.Linear(4, 4), []
    model = Counted({"a": shared, "b": torch.nn.Sequential(shared), "c": torch.nn.Linear(4, 2)})
    model.register_buffer("scale", torch.arange(3.0))
    expected = {name: t * 2 for name, t in model.state_dict().items()}
    meeting, calls = threading.Barrier(3, timeout=10), []

    def doubled(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        if len(calls) <= 3:
            meeting.wait()
        return t * 2

    converted(model, doubled, threads=3)
    assert len(calls) == 5 and len(applied) == 1  # a.weight, a.bias, c.weight, c.bias, scale: and nothing twice
    for name, t in model.state_dict().items():
        assert torch.equal(t, expected[name]), name
    assert model["b"][0].weight is model["a"].weight and isinstance(model["c"].weight, torch.nn.Parameter)


def test_a_failed_move_to_the_device_is_raised_once_the_work_is_done():
    llm = MovingLlm(RuntimeError("CUDA out of memory"))
    done = []
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        moved_while(llm, "meta", lambda: done.append("encoder"))
    assert done == ["encoder"]


def test_encoder_load_rejects_wrong_weights(tmp_path):
    torch.save({"modality_trunks.audio.nope": torch.zeros(1)}, tmp_path / "ib.pth")
    with pytest.raises(ValueError, match="ib.pth: (missing|unexpected) key"):
        MediaEncoder.load(tmp_path / "ib.pth", "tiny")
    with pytest.raises(ValueError, match="ib.pth: not an ImageBind state dict"):
        MediaEncoder.load(tmp_path / "ib.pth")  # the size is read from the weights
    with pytest.raises(FileNotFoundError, match="ImageBind weights not found"):
        MediaEncoder.load(tmp_path / "absent.pth", "tiny")


def test_every_decoder_ends_a_row_where_its_text_first_holds_the_answer_end(model, monkeypatch):
    """A model may spell the answer's end "\\n###" in pieces that no stop id sequence matches. Here one token of the
    greedy answer decodes as "\\n###": every decoder ends the row at that token (kept) with the answer the whole run
    gives, as `dr serve` does (`dr infer` used to decode on to max_new_tokens)."""
    from dataclasses import replace

    row = [Example("", "Hi?", [])]
    full = generate_ids(model, row, replace(GREEDY, max_new_tokens=32))[0]
    marker = next(t for k, t in enumerate(full) if k >= 9 and t not in full[:k])
    cut = full.index(marker)
    decode = model.tokenizer.decode

    def spelled(ids: list[int]) -> str:
        if marker not in ids:
            return decode(ids)
        k = ids.index(marker)
        return decode(ids[:k]) + "\n###" + decode(ids[k + 1 :])

    monkeypatch.setattr(model.tokenizer, "decode", spelled)
    for decoder in ("generate", "static", "engine"):
        ids = generate_ids(model, row, replace(GREEDY, max_new_tokens=32, decoder=decoder))[0]
        assert ids == full[: cut + 1], decoder
        assert model.answer(ids) == decode(full[:cut]), decoder


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_static_cache_loop_gives_generates_greedy_tokens(tiny_layout, variant):
    from dataclasses import replace

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir(variant), tiny_layout.imagebind)
    expected = generate_ids(model, examples(), GREEDY)
    assert generate_ids(model, examples(), replace(GREEDY, decoder="static")) == expected


def test_static_cache_loop_samples_reproducibly(tiny_layout):
    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5, decoder="static")
    first = generate_ids(model, examples(), gen)
    assert generate_ids(model, examples(), gen) == first and all(len(ids) > 0 for ids in first)


@pytest.mark.parametrize("decoder", ["generate", "static", "engine"])
def test_sampling_filters_top_k_like_the_original(model, decoder):
    # the original's transformers 4.29 sampled with its default top_k of 50; with top_k 1 sampling must be greedy
    greedy = generate_ids(model, examples(), GenerationConfig(max_new_tokens=8, do_sample=False, decoder="generate"))
    one = GenerationConfig(max_new_tokens=8, temperature=5.0, top_k=1, seed=0, decoder=decoder)
    assert generate_ids(model, examples(), one) == greedy
    assert GenerationConfig().top_k == 50


def test_static_cache_loop_shares_compiled_shapes_across_lengths_and_batch_sizes(tiny_layout):
    """Prompts are padded to a bucket and batches to a power of two, so a job's batches (its last, smaller one too)
    reuse one compiled decoder; the padding must not change any row's tokens."""
    from dataclasses import replace

    from model.generate import static as decode

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("alpha"), tiny_layout.imagebind)
    static = replace(GREEDY, decoder="static")
    short = Example("<Audio>", "Describe it.", examples()[0].media)
    long = Example("<Audio>", "Describe the music in detail please.", examples()[0].media)
    lengths = [model.prepare([row], left_pad=True).embeds.shape[1] for row in (short, long)]
    assert lengths[0] != lengths[1] and len({n // decode.PROMPT_BUCKET for n in lengths}) == 1
    decoders = []
    for rows in ([short, long, short], [long, short, long, long]):  # batch 3 is filled up to 4
        assert generate_ids(model, rows, static) == [generate_ids(model, [row], GREEDY)[0] for row in rows]
        decoders.append(next(iter(decode._decoder.values())))
    assert decoders[0] is decoders[1]


def test_original_delta_of_another_rank_says_which_alpha_it_is_loaded_with(tiny_layout, tmp_path, caplog):
    """The original's deltas keep the LoRA rank, not alpha: a rank-8 one loads with alpha 32 (scale 4) and says so in
    one line; an alpha given by the user sets the scale (alpha / rank)."""
    import logging

    from model.config import ModelConfig

    rank8 = load_model(
        tiny_layout.vicuna, None, tiny_layout.imagebind, config=ModelConfig(lora_r=8, encoder_size="tiny")
    )
    folder = save_delta(rank8, tmp_path / "rank8")
    (folder / "dr_config.json").unlink()  # as the original writes it
    with caplog.at_level(logging.WARNING, logger="model.network.checkpoint"):
        loaded = load_model(tiny_layout.vicuna, folder, tiny_layout.imagebind)
    assert loaded.config.lora_r == 8 and loaded.config.lora_alpha == 32
    assert "LoRA rank 8 with no saved alpha" in caplog.text and "loading with alpha 32 (scale 4)" in caplog.text
    q_proj = loaded.llama_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 32 / 8
    alpha16 = load_model(tiny_layout.vicuna, folder, tiny_layout.imagebind, config=ModelConfig(lora_alpha=16))
    q_proj = alpha16.llama_model.base_model.model.model.layers[0].self_attn.q_proj
    assert alpha16.config.lora_alpha == 16 and q_proj.scaling["default"] == 16 / 8
