"""DeepResonance: frozen ImageBind -> Linear projector -> (beta: one-layer pre-LLM fusion) -> Vicuna + LoRA.

Submodule names match the original (`visual_encoder`, `llama_model`, `llama_proj`, `preencoding`) so that
`state_dict()` keys are exactly the keys of its released delta checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from model.config import ModelConfig
from model.encoder import CLIPS_PER_ITEM, MediaEncoder
from model.prompt import Batch, answer_text, assemble, layout_row
from model.tokenizer import PromptTokenizer


@dataclass
class Example:
    """One prompt: its text, its media (ImageBind inputs or cached clip embeddings), and the target if training."""

    input: str
    instruction: str
    media: Sequence[tuple[str, torch.Tensor]] = ()  # (modality, tensor)
    output: str | None = None


def build_fusion(hidden: int, heads: int, ffn: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def lora_config(config: ModelConfig) -> LoraConfig:
    """The LoRA adapters the original trains on the LLM (r, alpha, dropout and targets from `config`)."""
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
    )


class DeepResonance(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        llm: LlamaForCausalLM,
        tokenizer: PromptTokenizer,
        encoder: MediaEncoder | None,
        encoder_dim: int,
        lora: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.visual_encoder = encoder
        llm_config = llm.config
        if lora:
            llm = get_peft_model(llm, lora_config(config))
        # as in the original: resize after LoRA wrapping, which leaves the new embed_tokens and lm_head trainable
        # (the released deltas hold them in full)
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        llm.get_input_embeddings().requires_grad_(True)
        llm.get_output_embeddings().requires_grad_(True)
        self.llama_model = llm
        self.llama_proj = nn.Linear(encoder_dim, llm_config.hidden_size)
        if config.fusion:
            self.preencoding = build_fusion(
                llm_config.hidden_size,
                llm_config.num_attention_heads,
                llm_config.intermediate_size,
                config.fusion_layers,
                config.fusion_dropout,
            )
        else:
            self.preencoding = None

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llama_proj.weight.dtype

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.llama_model.get_input_embeddings()

    def encode_media(self, media: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """ImageBind inputs -> clip embeddings [clips, D], batched per modality; 2-D tensors are already features."""
        out: list[torch.Tensor | None] = [None] * len(media)
        by_modality: dict[str, list[int]] = {}
        for i, (modality, tensor) in enumerate(media):
            if tensor.ndim == 2:
                out[i] = tensor
            else:
                by_modality.setdefault(modality, []).append(i)
        for modality, idx in by_modality.items():
            if self.visual_encoder is None:
                raise ValueError(f"{modality} inputs need an encoder, but this model was built with features only")
            feats = self.visual_encoder(modality, torch.stack([media[i][1] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = feats[j]
        if not self.config.embs_seq:  # pooled mode: one embedding per item, the mean over clips
            out = [f.mean(dim=0, keepdim=True) for f in out]
        return out

    def clips(self, modality: str, media: torch.Tensor | None = None) -> int:
        """Clip embeddings one media item puts in the prompt (features already computed say it themselves)."""
        if not self.config.embs_seq:
            return 1
        return media.shape[0] if media is not None and media.ndim == 2 else CLIPS_PER_ITEM[modality]

    def prompt_length(self, input_text: str, instruction: str, clips: Sequence[int]) -> int:
        """Positions of a prompt as `prepare` assembles it (cut at max_length), without running the encoder."""
        return min(len(layout_row(self.tokenizer, input_text, instruction, clips).ids), self.config.max_length)

    def example_length(self, ex: Example) -> int:
        return self.prompt_length(ex.input, ex.instruction, [self.clips(m, t) for m, t in ex.media])

    def answer(self, ids: Sequence[int]) -> str:
        """Generated ids -> the answer as the original extracts it (text before the first "\\n###")."""
        return answer_text(self.tokenizer.decode(list(ids)))

    def prepare(self, examples: Sequence[Example], left_pad: bool = False) -> Batch:
        """Examples -> embeddings, mask and labels (the original's `_prepare_batch_mixed_embedding`, vectorized)."""
        media = self.encode_media([item for ex in examples for item in ex.media])  # one encoder pass per modality
        layouts, start = [], 0
        for ex in examples:
            clips = [f.shape[0] for f in media[start : start + len(ex.media)]]
            layouts.append(layout_row(self.tokenizer, ex.input, ex.instruction, clips, ex.output))
            start += len(ex.media)
        projected = self.llama_proj(torch.cat(media).to(self.device, self.dtype)) if media else None
        return assemble(
            layouts,
            projected,
            self.embed_tokens,
            self.tokenizer.pad_id,
            self.config.max_length,
            fusion=self.preencoding,
            left_pad=left_pad,
        )

    def forward(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and next-token accuracy over target positions."""
        batch = self.prepare(examples)
        out = self.llama_model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, labels=batch.labels)
        predicted = out.logits[:, :-1].argmax(-1)
        targets = batch.labels[:, 1:]
        mask = targets != -100
        accuracy = (predicted[mask] == targets[mask]).float().mean() if mask.any() else out.loss.new_zeros(())
        return out.loss, accuracy

    def merge_lora(self) -> None:
        """Folds LoRA into the base weights for inference (same function, no adapter matmuls per step)."""
        if isinstance(self.llama_model, PeftModel):
            self.llama_model = self.llama_model.merge_and_unload()
