"""Every size, recipe and generation default in one place, as dataclasses (litgpt style)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

# the Hugging Face dataset repo that holds the released deltas and the test sets (ckpt/ downloads,
# model/data/catalog.py)
HF_DATA_REPO = "Sony/DeepResonance_data_models"
HF_WEB = "https://huggingface.co"  # for the by-hand instructions in error messages

Variant = Literal["alpha", "beta"]
Decoder = Literal["engine", "static", "generate"]

# ImageBind-huge as `imagebind_model.imagebind_huge` builds it (and as imagebind_huge.pth was saved).
IMAGEBIND_HUGE = dict(
    vision_embed_dim=1280,
    vision_num_blocks=32,
    vision_num_heads=16,
    text_embed_dim=1024,
    text_num_blocks=24,
    text_num_heads=16,
    out_embed_dim=1024,
    audio_drop_path=0.1,
    imu_drop_path=0.7,
)

# A 32-wide, one-block ImageBind: same preprocessing and shapes, ~2M parameters, for tests and the demo.
IMAGEBIND_TINY = dict(
    out_embed_dim=32,
    vision_embed_dim=32,
    vision_num_blocks=1,
    vision_num_heads=2,
    audio_embed_dim=32,
    audio_num_blocks=1,
    audio_num_heads=2,
    audio_drop_path=0.0,
    text_embed_dim=32,
    text_num_blocks=1,
    text_num_heads=2,
    depth_embed_dim=32,
    depth_num_blocks=1,
    depth_num_heads=2,
    thermal_embed_dim=32,
    thermal_num_blocks=1,
    thermal_num_heads=2,
    imu_embed_dim=32,
    imu_num_blocks=1,
    imu_num_heads=2,
    imu_drop_path=0.0,
)

ENCODER_SIZES = {"huge": IMAGEBIND_HUGE, "tiny": IMAGEBIND_TINY}

# ImageBind's clip sampling (its load_and_transform_*_data defaults): 3 two-second audio clips; 5 two-second video
# clips, each seen as 3 spatial crops; so the prompt holds this many clip embeddings per media item
AUDIO_CLIPS = 3
VIDEO_CLIPS, VIDEO_CROPS = 5, 3
CLIPS_PER_ITEM = {"audio": AUDIO_CLIPS, "image": 1, "video": VIDEO_CLIPS * VIDEO_CROPS}

# Vicuna-7B-v0 (LLaMA-7B) shapes, used by the benchmarks to build a random full-size model.
VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    vocab_size=32000,
)

LLAMA_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
)


@dataclass(frozen=True)
class ModelConfig:
    """The DeepResonance architecture on top of a base LLM and encoder (the original's base.yaml)."""

    variant: Variant = "alpha"
    encoder_size: str = "huge"
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    fusion_layers: int = 1
    fusion_dropout: float = 0.1
    max_length: int = 512
    # per-clip ImageBind embeddings (the original's --imagebind_embs_seq, used by both released models)
    embs_seq: bool = True

    @property
    def fusion(self) -> bool:
        return self.variant == "beta"

    @classmethod
    def from_dict(cls, saved: dict, base: ModelConfig | None = None) -> ModelConfig:
        """A config saved as JSON (dr_config.json, dr_export.json) over `base`; unknown keys are ignored."""
        known = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__}
        if "lora_targets" in known:
            known["lora_targets"] = tuple(known["lora_targets"])
        return replace(base or cls(), **known)


# Sampling below this temperature is greedy decoding (GenerationConfig turns do_sample off). At T = 1e-4 a logit gap
# of 0.01 already weighs the runner-up by exp(-100), so sampling is greedy in all but exact ties, while smaller values
# (1e-45, 5e-324) make logits / T overflow to inf and the softmax NaN. 0 is the usual way to ask for greedy.
MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class GenerationConfig:
    """The original samples with temperature 0.1, top_p 1.0 and up to 512 new tokens; top_k 50 is the default of
    the transformers 4.29 `generate` it called (it set no top_k), so it filtered too.

    A temperature below MIN_SAMPLING_TEMPERATURE (0 included) means greedy: do_sample is turned off here, the one
    place `dr infer`, `dr ask` and `dr serve` all build their settings. A temperature that is negative, NaN or
    infinite is a ValueError.
    """

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 0.1
    top_p: float = 1.0
    seed: int | None = 1337
    top_k: int = 50
    # "engine": continuous batching (model/engine/scheduler.py); "static": the static-batch loop
    # (model/generate/static.py); "generate": transformers' generate, the faithful reference the others are tested
    # against
    decoder: Decoder = "engine"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.do_sample and self.temperature < MIN_SAMPLING_TEMPERATURE:
            object.__setattr__(self, "do_sample", False)


@dataclass
class TrainConfig:
    """The original's two-stage recipe (config/*.yaml, dsconfig/*.json, scripts/train_*.sh) as defaults."""

    stage: int = 2
    datasets: list[str] = field(default_factory=list)
    epochs: int = 2
    max_steps: int = 0  # > 0: train this many optimizer steps (the schedule spans them) instead of `epochs`
    lr: float = 2e-4  # the peak of the schedule (the original's warmup_max_lr)
    warmup_rate: float = 0.1
    # the original's WarmupDecayLR: warm-up over max(10, 10% of the steps), log-shaped (DeepSpeed's default)
    warmup_min_steps: int = 10
    warmup_type: str = "log"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.001
    grad_clip: float = 1.0
    micro_batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 12
    save_every: int | None = None  # None: a checkpoint every tenth of the run (the newest kept); 0: only at the end
    log_every: int = 5
    group_size: int = 16  # batches grouped by length: rows sorted inside shuffled windows of this many batches
    encode_batch_size: int = 8  # media files per frozen-encoder call while filling the feature cache
    # the original resizes the embeddings after wrapping with LoRA, so embed_tokens and lm_head train in stage 2 (and,
    # resized after freezing the LLM, in its stage 1 too; off here by default: the paper trains the projector only)
    train_embeddings: bool = True

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> TrainConfig:
        defaults = STAGE_DEFAULTS[stage]
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return replace(cls(stage=stage, **defaults), **{k: v for k, v in overrides.items() if v is not None})


STAGE_DEFAULTS: dict[int, dict] = {
    1: dict(datasets=["coco", "music4way_m2t", "music4way_v2t"], epochs=5, train_embeddings=False),
    2: dict(
        datasets=[
            "alpaca",
            "musiccaps",
            "musicqa_mtt",
            "music4way_v2t",
            "music4way_m2t",
            "music4way_i2t",
            "music4way_mi2t",
            "music4way_mv2t",
        ],
        epochs=2,
        train_embeddings=True,
    ),
}
