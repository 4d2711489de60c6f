"""The engine's decoder layer with joined projections (model/engine/fused_layer.py) against transformers' own layer on
the same weights, and the joined weights' bookkeeping: views, no second copy, a new join where the model's weights
moved, transformers' layer where LoRA sits beside the weights."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from model.engine import fused_layer
from model.engine.fused_layer import fused_weights, run_layer
from model.engine.kv_cache import PagedKV, slot_attention_on
from model.engine.model_runner import packed_prefill


def tiny_lm(bias: bool) -> LlamaForCausalLM:
    """Two layers of 4 heads, biases random (the engine's attention has no grouped heads: Vicuna has none)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=50, attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    if bias:
        for name, p in lm.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p)
    return lm


def prefill(lm: LlamaForCausalLM, fused, sizes: list[int], embeds: torch.Tensor) -> tuple[torch.Tensor, PagedKV]:
    """Packed prompts through `lm` with each layer run by `run_layer` (joined where `fused` has its layer's weights)."""
    kv = PagedKV(lm.config, 4, 4, 40, torch.float32, torch.device("cpu"), "sdpa", block=16)
    for s, n in enumerate(sizes):
        assert kv.book.grow(s, n)
    kv.sync()
    index = kv.book.prefill_index(list(range(len(sizes))), sizes, max(sizes))
    of = dict(zip(lm.model.layers, fused, strict=True))

    def layer(block, hidden, cos, sin, packed):
        return run_layer(block, of[block], hidden, cos, sin, packed=packed)

    with slot_attention_on(lm), torch.inference_mode():
        return packed_prefill(lm, kv, embeds, index, sizes, layer), kv


@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_layer_computes_what_transformers_layer_computes(bias):
    """Three packed prompts through both layers of a model, once as transformers' layers and once with the joined
    products (the decode step's layer; its attention's inputs are the only difference from a decode step's): the
    same logits and the same keys and values in the pool. Each product's parts split in the order
    q, k, v and gate, up with their biases; a swap of two parts, a bias left out or rotary embeddings applied to the
    wrong tensors change both (greedy answers of a tiny random model can miss a swap of q and k)."""
    lm = tiny_lm(bias)
    sizes = [5, 9, 3]
    embeds = torch.randn(len(sizes), max(sizes), lm.config.hidden_size)
    expected, kv_expected = prefill(lm, [None, None], sizes, embeds)
    fused = fused_weights(lm)
    assert all(f is not None for f in fused)
    got, kv = prefill(lm, fused, sizes, embeds)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(kv_expected.keys + kv_expected.values, kv.keys + kv.values, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert kv.keys[1].abs().sum() > 0


def test_the_joined_weights_are_the_models_own_and_joined_once():
    """After the join each projection's weight is a view into the joined weight (no second copy of the model's
    projections), a second engine on the model reuses the join, and once the model's weights are replaced (cast)
    the next join is made from the new weights."""
    lm = tiny_lm(bias=True)
    attn = lm.model.layers[0].self_attn
    q_before = attn.q_proj.weight.detach().clone()
    first = fused_weights(lm)
    qkv = first[0].qkv
    assert qkv.sizes == (64, 64, 64)
    assert attn.q_proj.weight.data_ptr() == qkv.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == qkv.weight[64].data_ptr()
    assert attn.v_proj.bias.data_ptr() == qkv.bias[128].data_ptr()
    assert torch.equal(attn.q_proj.weight, q_before)
    assert fused_weights(lm)[0].qkv is qkv
    lm.double()
    again = fused_weights(lm)[0].qkv
    assert again is not qkv and again.weight.dtype == torch.float64
    assert torch.equal(again.weight[:64], q_before.double())
    assert attn.q_proj.weight.data_ptr() == again.weight.data_ptr()


def test_layers_with_lora_beside_their_weights_run_as_transformers_layers(monkeypatch):
    """LoRA not merged wraps the projections (the tiny models of test_engine.py): no join; none with FUSE_PROJECTIONS
    off either."""
    lm = tiny_lm(bias=False)
    peft = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert fused_weights(peft.get_base_model()) == [None, None]
    monkeypatch.setattr(fused_layer, "FUSE_PROJECTIONS", False)
    assert fused_weights(tiny_lm(bias=False)) == [None, None]


def test_a_join_made_in_inference_mode_leaves_the_weights_trainable():
    """The engine joins inside inference mode; the joined weights must still work under autograd (a model trained
    after an engine ran on it): inference tensors cannot be saved for backward."""
    lm = tiny_lm(bias=False)
    with torch.inference_mode():
        fused_weights(lm)
    lm.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    loss = lm(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss
    loss.backward()
    assert lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_the_inductor_compiled_step_with_joined_projections_equals_one_row_generate(tiny_layout):
    """The engine's decode step compiled by Inductor (on the CPU; on a GPU tests/test_gpu.py runs it with CUDA graphs)
    on a model with LoRA merged, so every layer runs joined: 7 rows through 2 slots, each row's greedy ids those of
    `generate` on it alone (transformers' layers)."""
    from dataclasses import replace

    from model.engine.scheduler import Engine
    from model.engine.sizing import cache_length
    from model.generate.base import generate_ids
    from model.network.checkpoint import load_model
    from tests.test_engine import REFERENCE, rows, run

    model = load_model(tiny_layout.vicuna, tiny_layout.delta_dir("beta"), tiny_layout.imagebind)
    model.merge_lora()
    examples = rows()
    gens = [replace(REFERENCE, max_new_tokens=n) for n in (3, 12, 5, 9, 1, 7, 12)]
    expected = {i: generate_ids(model, [ex], g)[0] for i, (ex, g) in enumerate(zip(examples, gens, strict=True))}
    length = cache_length(max(model.example_length(ex) for ex in examples), 12)
    torch._dynamo.reset()
    engine = Engine(model, 2, length, 12, k_cap=1, kernel="sdpa", compile=True, sync_every=2, refill_min=1, narrow=[1])
    assert all(f is not None for f in engine.step.fused)
    assert run(engine, examples, [replace(g, decoder="engine") for g in gens]) == expected
    torch._dynamo.reset()
