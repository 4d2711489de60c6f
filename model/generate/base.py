"""Batched generation: left-padded prompts, per-row stopping at "###", answers cut at the first "\\n###"."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from model.config import GenerationConfig
from model.engine.sampler import row_key
from model.engine.scheduler import Engine
from model.engine.sequence import Request
from model.engine.sizing import cache_length, top_k_cap
from model.generate.static import decode_static
from model.network.deepresonance import DeepResonance, Example
from model.text.prompt import cut_at_stop, stop_sequences


class StopAtSequences(StoppingCriteria):
    """Per-row stop once the generated ids end with any stop sequence.

    The original stops only on id 835 ("▁###"); it also stops here on "\\n###" tokenized as it follows an answer.
    Both come after the answer's end, which is cut at the first "\\n###", so answers are unchanged and rows finish
    as soon as they are done instead of running to max_new_tokens.
    """

    def __init__(self, stops: Sequence[Sequence[int]]) -> None:
        self.stops = [torch.tensor(s) for s in stops]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.stops and self.stops[0].device != input_ids.device:  # once, not a host-to-device copy per step
            self.stops = [s.to(input_ids.device) for s in self.stops]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for stop in self.stops:
            if input_ids.shape[1] >= len(stop):
                done |= (input_ids[:, -len(stop) :] == stop).all(dim=1)
        return done


def run_examples(model: DeepResonance, examples: Sequence[Example], gen: GenerationConfig) -> list[list[int]]:
    """New ids per example through an eager engine with one slot per example (`dr ask`). Rows draw from the streams
    of their positions in `examples` with `gen.seed`."""
    engine = Engine(
        model,
        len(examples),
        cache_length(max(model.example_length(ex) for ex in examples), gen.max_new_tokens),
        gen.max_new_tokens,
        k_cap=top_k_cap(model, gen),
        compile=False,
    )
    requests = [Request(i, ex, gen, row_key(gen.seed, str(i), ex.instruction)) for i, ex in enumerate(examples)]
    ids: list[list[int]] = [[] for _ in examples]
    for batch in engine.run(requests):
        for u in batch:
            if u.error:
                raise ValueError(f"example {u.handle}: {u.error}")
            ids[u.handle] = u.ids
    return ids


@torch.inference_mode()
def generate_ids(model: DeepResonance, examples: Sequence[Example], gen: GenerationConfig) -> list[list[int]]:
    """New token ids per example, cut after the stop sequence (or EOS)."""
    batch = model.prepare(examples, left_pad=True)
    tok = model.tokenizer
    stops = stop_sequences(tok)
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    if gen.decoder == "engine":
        return run_examples(model, examples, gen)
    if gen.decoder == "static":
        out = decode_static(
            model.llama_model,
            batch.embeds,
            batch.attention_mask,
            gen.max_new_tokens,
            stops,
            tok.eos_id,
            gen.do_sample,
            gen.temperature,
            gen.top_p,
            gen.top_k,
            compile=batch.embeds.is_cuda,
        )
        return [cut_at_stop(ids, tok.eos_id, stops) for ids in out.tolist()]
    options = dict(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None) if gen.do_sample else {}
    out = model.llama_model.generate(
        inputs_embeds=batch.embeds,
        attention_mask=batch.attention_mask,
        max_new_tokens=gen.max_new_tokens,
        do_sample=gen.do_sample,
        **options,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        stopping_criteria=StoppingCriteriaList([StopAtSequences(stops)]),
    )
    return [cut_at_stop(ids, tok.eos_id, stops) for ids in out.tolist()]


def generate(model: DeepResonance, examples: Sequence[Example], gen: GenerationConfig | None = None) -> list[str]:
    """Answers for a batch of examples, as the original extracts them."""
    gen = gen or GenerationConfig()
    return [model.answer(ids) for ids in generate_ids(model, examples, gen)]
