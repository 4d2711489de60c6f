"""What a stage trains and how: the trainable set, AdamW (the original's DeepSpeed "Adam": adam_w_mode defaults to
on) and DeepSpeed's WarmupDecayLR rebuilt as a LambdaLR, so the one-process and DeepSpeed paths step alike."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import TrainConfig
from model.network.deepresonance import DeepResonance


def lr_factor(step: int, total: int, warmup: int, kind: str = "log") -> float:
    """DeepSpeed's WarmupDecayLR as a multiple of the peak lr at optimizer step `step` (0-based).

    Warm-up from 0 to 1 over `warmup` steps (log: log(step + 1) / log(warmup), DeepSpeed's default, which the
    original used; or linear), then linear decay to 0 at `total`.
    """
    warmup = max(2, warmup)  # as WarmupLR
    if step < warmup:
        return math.log(step + 1) / math.log(warmup) if kind == "log" else step / warmup
    return max(0.0, (total - step) / max(1.0, total - warmup))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """The original: max(10, int(total * warmup_rate)); the 10 is `warmup_min_steps`."""
    return max(cfg.warmup_min_steps, int(total * cfg.warmup_rate))


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: --max-steps, else those of `epochs` epochs (at least one)."""
    return cfg.max_steps or max(1, cfg.epochs * micro_batches_per_epoch // cfg.grad_accum)


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, total: int, warmup: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (the original's DeepSpeed "Adam") + WarmupDecayLR, the same objects on both paths."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.warmup_type))
    return optimizer, scheduler


def embedding_params(model: DeepResonance) -> list[nn.Parameter]:
    """The input and output embeddings (the original resized both for its special tokens)."""
    return [model.embed_tokens.weight, model.llama_model.get_output_embeddings().weight]


def set_trainable(model: DeepResonance, stage: int, train_embeddings: bool) -> list[str]:
    """Stage 1: projector (+ fusion); stage 2: also LoRA. Embeddings when asked (the original trained the resized
    embed_tokens / lm_head: its resize after freezing / LoRA wrapping left them trainable). Returns the names."""
    embeddings = {id(p) for p in embedding_params(model)} if train_embeddings else set()
    names = []
    for name, param in model.named_parameters():
        train = (
            name.startswith(("llama_proj.", "preencoding."))
            or (stage == 2 and ".lora_" in name)
            or id(param) in embeddings
        )
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names
