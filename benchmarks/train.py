"""`dr bench train`: stage-2 samples/s, the original's recipe beside dr's in one process on one GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.timing import timed
from benchmarks.workloads import VOCAB, full_size_llm
from model.media.encoder import MediaEncoder


class _StepModel(torch.nn.Module):
    """Stage-2 shape of DeepResonance for timing: projected audio clips + text through the LLM with LoRA."""

    def __init__(self, llm: torch.nn.Module) -> None:
        super().__init__()
        self.llama_model = llm
        self.llama_proj = torch.nn.Linear(1024, llm.config.hidden_size, device="cuda")

    def forward(self, feats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        text = self.llama_model.get_input_embeddings()(ids)
        embeds = torch.cat([self.llama_proj(feats.to(self.llama_proj.weight.dtype)).to(text.dtype), text], dim=1)
        labels = torch.cat([torch.full(feats.shape[:2], -100, device="cuda"), ids], dim=1)
        return self.llama_model(inputs_embeds=embeds, labels=labels).loss


def _trainable(llm: torch.nn.Module) -> None:
    """The original's stage-2 trainable set: LoRA, and the resized embed_tokens / lm_head."""
    llm.get_input_embeddings().requires_grad_(True)
    llm.get_output_embeddings().requires_grad_(True)


def bench_train(steps: int = 5, text_tokens: int = 128, dr_micro_batch: int = 16, log: Callable[[str], None] = print):
    """Stage-2 samples/s: the original's recipe (ImageBind on the fly, fp16, DeepSpeed ZeRO-2 with CPU optimizer
    offload, micro-batch 2) vs dr's (cached features, bf16 autocast over fp32 trainable weights, optimizer on the
    GPU, larger micro-batch). Needs DeepSpeed for the original's side."""
    import os

    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    out = {"device": torch.cuda.get_device_name(), "text_tokens": text_tokens}

    with torch.device("cuda"):
        encoder = MediaEncoder("huge")
    encoder.drop_unused_towers()
    encoder.to(dtype=torch.float16)
    model = _StepModel(full_size_llm(torch.float16, "eager", lora=True))
    _trainable(model.llama_model)
    model.train()
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "fp16": {"enabled": True, "initial_scale_power": 16},
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.001}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)

    def original_step():
        audio = torch.randn(2, 3, 1, 128, 204, device="cuda", dtype=torch.float16)
        feats = encoder("audio", audio)
        ids = torch.randint(0, VOCAB, (2, text_tokens), device="cuda")
        loss = engine(feats, ids)
        engine.backward(loss)
        engine.step()

    seconds = timed(original_step, steps)
    out["original_samples_per_s"] = round(2 / seconds, 2)
    log(f"original recipe: {2 / seconds:.2f} samples/s ({seconds:.3f} s per step of 2)")
    engine.destroy()
    del model
    torch.cuda.empty_cache()

    llm = full_size_llm(torch.bfloat16, "sdpa", lora=True)
    model = _StepModel(llm)
    _trainable(llm)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.001, fused=True
    )
    cached = torch.randn(dr_micro_batch, 3, 1024, device="cuda")

    def dr_step():
        ids = torch.randint(0, VOCAB, (dr_micro_batch, text_tokens), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(cached, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(dr_step, steps)
    out["dr_samples_per_s"] = round(dr_micro_batch / seconds, 2)
    out["dr_micro_batch"] = dr_micro_batch
    out["ratio"] = round(out["dr_samples_per_s"] / out["original_samples_per_s"], 1)
    log(f"dr recipe: {dr_micro_batch / seconds:.2f} samples/s ({seconds:.3f} s per step of {dr_micro_batch})")
    return out
