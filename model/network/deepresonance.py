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

from model.config import CLIPS_PER_ITEM, ModelConfig
from model.io.transfer import to_device
from model.media.encoder import MediaEncoder
from model.text.prompt import IGNORE, MEDIA, IdBatch, answer_text, batch_ids, layout_row
from model.text.tokenizer import PromptTokenizer


@dataclass
class Example:
    """One prompt: its text, its media (ImageBind inputs or cached clip embeddings), and the target if training."""

    input: str
    instruction: str
    media: Sequence[tuple[str, torch.Tensor]] = ()  # (modality, tensor)
    output: str | None = None


@dataclass
class Batch:
    """Right-padded (training) or left-padded (generation) model inputs."""

    embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE outside targets
    lengths: torch.Tensor  # [B]
    sizes: tuple[int, ...]  # `lengths` on the host


def embed_batch(
    rows: IdBatch,
    media: torch.Tensor | None,
    embed_tokens: nn.Module,
    fusion: nn.Module | None = None,
) -> Batch:
    """Embeds a batch in one step (LLaVA style): the ids are embedded, then `media`, every projected clip embedding
    of the batch [N, H] in row-major slot order, is written into the MEDIA slots by one masked scatter.

    Fusion (beta) runs over each row's input segment with a key padding mask, over the whole rows: the cut to
    `rows.keep` positions and the left padding come after it, as in the original.
    """
    slots = rows.ids == MEDIA
    embeds = embed_tokens(rows.ids.clamp(min=0))
    n_slots = rows.media_slots
    if n_slots:
        if media is None or media.shape[0] != n_slots:
            got = 0 if media is None else media.shape[0]
            raise ValueError(f"batch has {n_slots} media slots but {got} clip embeddings")
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), media.to(embeds.dtype))
    if fusion is not None:
        width = rows.longest_input
        inside = torch.arange(width, device=rows.ids.device).unsqueeze(0) < rows.input_lens.unsqueeze(1)
        fused = fusion(embeds[:, :width], src_key_padding_mask=~inside)
        embeds = torch.cat([torch.where(inside.unsqueeze(-1), fused, embeds[:, :width]), embeds[:, width:]], dim=1)
    embeds = embeds[:, : rows.keep]
    if rows.order is not None:
        embeds = embeds.gather(1, rows.order.unsqueeze(-1).expand_as(embeds))
    return Batch(embeds, rows.attention_mask, rows.labels, rows.lengths, rows.sizes)


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
        projected = self.llama_proj(to_device(torch.cat(media), self.device).to(self.dtype)) if media else None
        device = self.embed_tokens.weight.device
        rows = batch_ids(layouts, self.tokenizer.pad_id, self.config.max_length, left_pad, device)
        return embed_batch(rows, projected, self.embed_tokens, self.preencoding)

    def forward(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and next-token accuracy over target positions."""
        batch = self.prepare(examples)
        out = self.llama_model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, labels=batch.labels)
        predicted = out.logits[:, :-1].argmax(-1)
        targets = batch.labels[:, 1:]
        mask = targets != IGNORE
        accuracy = (predicted[mask] == targets[mask]).float().mean() if mask.any() else out.loss.new_zeros(())
        return out.loss, accuracy

    def merge_lora(self) -> None:
        """Folds LoRA into the base weights for inference (same function, no adapter matmuls per step)."""
        if isinstance(self.llama_model, PeftModel):
            self.llama_model = self.llama_model.merge_and_unload()
