"""A complete tiny random checkpoint set in the original's layout: what tests and the demo run on.

It has every piece the real set has (a LLaMA folder with a sentencepiece tokenizer, ImageBind weights, alpha and
beta deltas in the original's key format), built in seconds on a CPU.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ckpt.layout import layout
from model.config import LLAMA_TINY, ModelConfig
from model.media.encoder import MediaEncoder
from model.network.checkpoint import save_delta
from model.network.deepresonance import DeepResonance
from model.text.prompt import ASSISTANT, HUMAN, TARGET_END
from model.text.tokenizer import STOP_PIECE, PromptTokenizer

DEFAULT_CORPUS = [
    "Describe the music in detail.",
    "What instrument is playing? What is the tempo, the key and the mood of this song?",
    "A calm piano piece in C major with a slow tempo and soft dynamics.",
    "The electric guitar plays a fast rhythm over loud drums and a deep bass line.",
    "This is an energetic rock song with distorted guitars, a male vocalist and a steady beat.",
    "A string quartet plays a sad melody in a minor key; violins, viola and cello.",
    "Listen to this music and the image, then answer the question about the video.",
    "The genre is jazz, blues, classical, pop, hip hop, electronic, country, reggae or metal.",
]


def train_tokenizer(folder: Path, corpus: Iterable[str] | None = None, vocab_size: int = 512) -> Path:
    """A LLaMA-style BPE sentencepiece model (byte fallback, ids unk 0 / bos 1 / eos 2) with the '▁###' piece."""
    lines = list(corpus or DEFAULT_CORPUS)
    template = [f"{HUMAN}{line}{ASSISTANT}{line}{TARGET_END}" for line in lines]
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((lines + template) * 4),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=[STOP_PIECE],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    prefix.with_suffix(".vocab").unlink()
    return prefix.with_suffix(".model")


def write_base_llm(folder: Path, vocab_size: int, seed: int = 0, **sizes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        **{**LLAMA_TINY, **sizes},
    )
    llm = LlamaForCausalLM(config)
    llm.save_pretrained(folder)
    return llm


def write_tiny_set(root: str | Path, corpus: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Writes pretrained_ckpt (tiny LLaMA + tokenizer, tiny ImageBind) and random alpha and beta deltas."""
    paths = layout(root)
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_tokenizer(Path(tmp), corpus)
        base_tok = PromptTokenizer(sp_model, added={})
        vocab = len(base_tok)
        write_base_llm(paths.vicuna, vocab, seed)
        base_tok.save(paths.vicuna)
    torch.manual_seed(seed)
    encoder = MediaEncoder("tiny")
    paths.imagebind_dir.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.imagebind.state_dict(), paths.imagebind)
    tokenizer = PromptTokenizer(paths.vicuna / "tokenizer.model")
    for i, variant in enumerate(("alpha", "beta")):
        torch.manual_seed(seed + 1 + i)
        llm = LlamaForCausalLM.from_pretrained(paths.vicuna)
        model = DeepResonance(ModelConfig(variant=variant, encoder_size="tiny"), llm, tokenizer, None, encoder.out_dim)
        with torch.no_grad():  # LoRA B starts at zero; make the deltas matter
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.02)
        save_delta(model, paths.delta_dir(variant))
    return paths.root
