"""The random-weights models and workloads every bench shares: Vicuna-7B-shaped LLMs (with LoRA as the original
wraps it, or as a DeepResonance that never stops on its own), decoding the original's way or dr's, and audio prompts
with caption-like answer lengths. Weights are random: the numbers measure speed only."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.timing import timed_with_warmup
from model.config import VICUNA_7B, ModelConfig
from model.generate.base import StopByRule
from model.generate.static import decode_static
from model.network.deepresonance import lora_config
from model.text.stopping import StopRule

VOCAB = 32006
PROMPT = 28  # positions of a typical audio prompt: 3 clips + the instruction
NEW_TOKENS = 64
MUSICCAPS_ROWS = 2858
INSTRUCTION = "What is the genre of this music, and which instruments play in it?"  # a MusicQA-like question


def full_size_llm(
    dtype: torch.dtype, attn: str, lora: bool, device: str = "cuda", sizes: dict = VICUNA_7B
) -> torch.nn.Module:
    """A random LLaMA of `sizes` (Vicuna-7B's by default) with Vicuna's 32006-row vocabulary, LoRA as the original's
    stage 2 wraps it (its B random, so merging changes the weights) when `lora`."""
    config = LlamaConfig(**{**sizes, "vocab_size": VOCAB}, tie_word_embeddings=False, attn_implementation=attn)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
    llm.eval()
    if lora:
        llm = get_peft_model(llm, lora_config(ModelConfig())).eval()
        with torch.no_grad():
            for name, p in llm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    return llm


def decode(
    llm, batch: int, dtype: torch.dtype, original: bool, new_tokens: int = NEW_TOKENS, static: bool = False
) -> tuple[float, float]:
    """Seconds of the first call, and seconds after it, to generate `new_tokens` for `batch` rows after a
    PROMPT-position prompt, on the LLM's device (the static loop compiled on CUDA only, as `generate_ids` does)."""
    hidden, device = llm.config.hidden_size, llm.device
    embeds = torch.randn(batch, PROMPT, hidden, device=device, dtype=dtype) * 0.02
    mask = torch.ones(batch, PROMPT, dtype=torch.long, device=device)
    never = StopRule(-1, ((-5,),), lambda ids: "")  # never fires: every run makes exactly new_tokens
    stop = [StopByRule(never)]
    if original:
        kwargs = dict(
            do_sample=True,
            temperature=0.1,
            top_p=1.0,
            top_k=None,
            output_attentions=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    else:
        kwargs = dict(do_sample=False)

    def run():
        if static:  # dr's own loop: static cache, one compiled step, and a rule that never fires
            return decode_static(llm, embeds, mask, new_tokens, never, compile=device.type == "cuda")
        with torch.inference_mode():
            llm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                stopping_criteria=stop,
                pad_token_id=2,
                eos_token_id=2,
                **kwargs,
            )

    return timed_with_warmup(run, 2, device)


def realistic_lengths(rows: int, tail: float = 0.0, seed: int = 0) -> list[int]:
    """Caption-like answer lengths: lognormal with median 80 tokens and log-sd 0.45, clipped to 8..512 (mean about
    91); `tail`: the share of rows that run to 512 instead, as degenerate sampled answers do."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(np.exp(np.log(80) + 0.45 * rng.standard_normal(rows))), 8, 512)
    lengths[rng.random(rows) < tail] = 512
    return lengths.astype(int).tolist()


def never_stopping_model(workdir: str, sizes: dict = VICUNA_7B, device: str = "cuda", vocab: int = VOCAB):
    """DeepResonance with a Vicuna-7B-shaped LLM (random bf16 weights, full 32006-row vocabulary, LoRA merged: no
    adapters) and no encoder (prompts carry clip features); random weights never end a row (`never_stopping`)."""
    from pathlib import Path

    from ckpt.tiny import train_tokenizer
    from model.network.deepresonance import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    tok = PromptTokenizer(train_tokenizer(Path(workdir) / "tok"))
    config = LlamaConfig(**{**sizes, "vocab_size": len(tok)}, tie_word_embeddings=False, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = DeepResonance(ModelConfig(variant="alpha"), llm, tok, None, 1024, lora=False).to(device, dtype)
    model.llama_model.resize_token_embeddings(vocab, mean_resizing=False)
    return never_stopping(model).eval()


def never_stopping(model):
    """Zeroes the lm_head rows of EOS and of every piece holding "\\n" or "#", so random weights never end a row
    (model/text/stopping.py): the benchmark's length oracle (each row's max_new_tokens) ends it. Ids past the
    tokenizer's decode as nothing (the engine decodes rows as they grow)."""
    tok = model.tokenizer
    decode, known = tok.decode, len(tok)
    tok.decode = lambda ids: decode([i for i in ids if i < known])
    with torch.no_grad():
        for token in [tok.eos_id, *(i for i in range(known) if set(decode([i])) & set("\n#"))]:
            model.llama_model.get_output_embeddings().weight[token] = 0
    return model


def audio_rows(rows: int) -> list:
    """`rows` audio prompts (3 random clip features each, the same question), the same for every run."""
    from model.network.deepresonance import Example

    g = torch.Generator().manual_seed(0)
    return [Example("<Audio>", INSTRUCTION, [("audio", torch.randn(3, 1024, generator=g))]) for _ in range(rows)]


PROMPT_SHAPES = ("short", "long", "varied")  # audio + a MusicQA question; multiple-choice sized; 16-210 positions
LONG_PROMPT = 170  # a MuChoMusic or RUListening question with its options
VARIED = (16, 210)


def prompt_rows(model, rows: int, shape: str, seed: int = 0) -> list:
    """`rows` prompts of one shape: "short" (`audio_rows`), "long" (those rows' questions lengthened to LONG_PROMPT
    positions) or "varied" (each row's length drawn from VARIED; rows shorter than an audio prompt are text only),
    the same for every run. Questions grow by a filler word, whose positions per word are measured once."""
    import random

    from model.network.deepresonance import Example

    base = audio_rows(rows)
    if shape == "short":
        return base
    if shape not in PROMPT_SHAPES:
        raise ValueError(f"unknown prompt shape {shape!r}: one of {', '.join(PROMPT_SHAPES)}")
    draw = random.Random(seed)
    targets = [LONG_PROMPT] * rows if shape == "long" else [draw.randint(*VARIED) for _ in range(rows)]
    audio = model.example_length(base[0])

    def grown(ex: Example, target: int) -> Example:
        plain = model.example_length(ex)
        per_word = (model.example_length(Example(ex.input, ex.instruction + " music" * 100, ex.media)) - plain) / 100
        words = max(0, round((target - plain) / per_word))
        return Example(ex.input, ex.instruction + " music" * words, ex.media)

    text = Example("", "Answer briefly.", [])
    made: dict[tuple[bool, int], Example] = {}
    out = []
    for ex, target in zip(base, targets, strict=True):
        with_audio = target >= audio
        shaped = made.get((with_audio, target)) or grown(ex if with_audio else text, target)
        made[(with_audio, target)] = shaped
        out.append(Example(shaped.input, shaped.instruction, ex.media if with_audio else []))
    return out
