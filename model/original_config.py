"""The original's YAML configs (its code/config/base.yaml, stage_1.yaml, stage_2.yaml) as dr's dataclass fields.

`--config` takes these files as the original's users have them, so what they tuned there (a LoRA rank and alpha,
the fusion encoder, a seed, the dataset list) carries over without translating keys by hand. Several files merge in
the order given, later ones winning, as the original merges base.yaml with a stage's file. Keys for parts the original
inherited from NExT-GPT and never uses for DeepResonance (generation heads, checkpoint paths, shard sizes) are
listed in one log line and otherwise ignored; any other key is an error naming the file, since a silently dropped
setting would change a run without saying so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# the original's key -> ModelConfig field
MODEL_KEYS = {
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "max_length": "max_length",
    "preencoding_dropout": "fusion_dropout",
    "num_preencoding_layers": "fusion_layers",
    "imagebind_version": "encoder_size",
}
# the original's key (top level, or inside `train:`) -> TrainConfig field
TRAIN_KEYS = {
    "seed": "seed",
    "logging_step": "log_every",
    "max_length": "max_length",
    "warmup_rate": "warmup_rate",
    "epochs": "epochs",
    "dataset_name_list": "datasets",
}
# values dr is built for: another one is a different model, not a setting
FIXED = {"vicuna_version": "7b_v0"}
UNUSED = {
    "models",
    "steps_trained",
    "num_clip_tokens",
    "gen_emb_dim",
    "pretrained_ckpt_path",
    "freeze_input_proj",
    "freeze_output_proj",
    "prompt",
    "max_shard_size",
}


class ConfigError(ValueError):
    """A config file dr cannot take as it is; the message is one line naming the file."""


@dataclass
class OriginalConfig:
    """What the files set: ModelConfig and TrainConfig fields, the stage their `freeze_lm` implies, and the keys
    that were ignored."""

    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    stage: int | None = None
    ignored: list[str] = field(default_factory=list)


def read_original_configs(paths: list[Path]) -> OriginalConfig:
    """The merged settings of the original's YAML files, in order (later files win)."""
    import yaml

    out = OriginalConfig()
    for path in paths:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            reason = " ".join(str(err).split())  # YAML's messages span lines; the error stays one
            raise ConfigError(f"{path}: not a readable YAML file ({type(err).__name__}: {reason})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of the original's config keys, got {type(loaded).__name__}")
        _merge(path, loaded, out)
    if out.ignored:
        log.info("not used by dr (NExT-GPT leftovers in the original's configs): %s", ", ".join(out.ignored))
    return out


def _merge(path: Path, loaded: dict, out: OriginalConfig) -> None:
    for key, value in loaded.items():
        if key != "train":
            _set(path, key, key, value, out, top_level=True)
        elif isinstance(value, dict):
            for inner, inner_value in value.items():
                _set(path, f"train.{inner}", inner, inner_value, out, top_level=False)
        else:
            raise ConfigError(f"{path}: `train` should be a mapping, got {type(value).__name__}")


def _set(path: Path, name: str, key: str, value: object, out: OriginalConfig, top_level: bool) -> None:
    """One key (`name` as written, e.g. "train.epochs"); model and stage keys count at the top level only."""
    if key in UNUSED:
        if name not in out.ignored:
            out.ignored.append(name)
        return
    if top_level and key == "freeze_lm":
        out.stage = 1 if value else 2
        return
    if top_level and key in FIXED:
        if str(value).strip() != FIXED[key]:
            raise ConfigError(f"{path}: {key} {value!r}: dr builds DeepResonance on {FIXED[key]} only")
        return
    model_field = MODEL_KEYS.get(key) if top_level else None
    train_field = TRAIN_KEYS.get(key)
    if model_field is None and train_field is None:
        raise ConfigError(f"{path}: unknown key {name!r} (not one of the original's config keys dr reads)")
    if model_field is not None:
        out.model[model_field] = value
    if train_field is not None:
        out.train[train_field] = list(value) if key == "dataset_name_list" else value
