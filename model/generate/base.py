"""Batched generation through one of three decoders (`GenerationConfig.decoder`): the continuous-batching engine, the
static-KV loop or transformers' `generate`. All end rows by model/text/stopping.py's rule; answers are cut at the first
"\\n###"."""

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
from model.text.stopping import RowEnds, StopRule


class StopByRule(StoppingCriteria):
    """transformers' per-row stop by model/text/stopping.py's rule: `generate` reads every step's flags on the host
    anyway, so each step's new ids are checked there."""

    def __init__(self, rule: StopRule) -> None:
        self.rule = rule
        self.ends: RowEnds | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.ends = self.ends or RowEnds(self.rule, input_ids.shape[0])
        return torch.tensor(self.ends.add(input_ids[:, -1:].tolist()), device=input_ids.device)


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
    """New token ids per example, each cut where model/text/stopping.py's rule ends its row."""
    if gen.decoder == "engine":  # the engine prepares the rows itself: prepared here too, media would encode twice
        return run_examples(model, examples, gen)
    batch = model.prepare(examples, left_pad=True)
    tok = model.tokenizer
    rule = StopRule.of(tok)
    if gen.seed is not None:
        torch.manual_seed(gen.seed)
    if gen.decoder == "static":
        out = decode_static(
            model.llama_model,
            batch.embeds,
            batch.attention_mask,
            gen.max_new_tokens,
            rule,
            gen.do_sample,
            gen.temperature,
            gen.top_p,
            gen.top_k,
            compile=batch.embeds.is_cuda,
        )
        return [rule.cut(ids) for ids in out.tolist()]
    options = dict(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None) if gen.do_sample else {}
    out = model.llama_model.generate(
        inputs_embeds=batch.embeds,
        attention_mask=batch.attention_mask,
        max_new_tokens=gen.max_new_tokens,
        do_sample=gen.do_sample,
        **options,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        stopping_criteria=StoppingCriteriaList([StopByRule(rule)]),
    )
    return [rule.cut(ids) for ids in out.tolist()]


def generate(model: DeepResonance, examples: Sequence[Example], gen: GenerationConfig | None = None) -> list[str]:
    """Answers for a batch of examples, as the original extracts them."""
    gen = gen or GenerationConfig()
    return [model.answer(ids) for ids in generate_ids(model, examples, gen)]
