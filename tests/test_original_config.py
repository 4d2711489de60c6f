"""The original's YAML configs (code/config/base.yaml and stage_N.yaml, as its repository ships them) as dr's fields."""

from __future__ import annotations

import logging

import pytest

from deepresonance_cli.infer import model_config
from model.original_config import ConfigError, read_original_configs

# the original's files, key for key (sony/DeepResonance code/config/; one long list wrapped)
BASE = """\
models:
    deepresonance:
        model_name: DeepResonanceModel
        agent_name: DeepSpeedAgent

seed: 12
steps_trained: 0
max_length: 512
logging_step: 5
num_clip_tokens: 77
gen_emb_dim: 768
pretrained_ckpt_path: ../ckpt/pretrained_ckpt

vicuna_version: 7b_v0
imagebind_version: huge

preencoding_dropout: 0.1
num_preencoding_layers: 1
"""
STAGE_2 = """\
lora_r: 32
lora_alpha: 32
lora_dropout: 0.1

freeze_lm: false
freeze_input_proj: false
freeze_output_proj: false
prompt: ''

train:
    warmup_rate: 0.1
    epochs: 2
    max_length: 512
    max_shard_size: 10GB
    dataset_name_list: ['alpaca', 'musiccaps', 'musicqa_mtt', 'music4way_v2t', 'music4way_m2t', 'music4way_i2t',
        'music4way_mi2t', 'music4way_mv2t']
"""
STAGE_1 = """\
freeze_lm: true
freeze_input_proj: false
freeze_output_proj: true
prompt: 'generate a caption'
train:
    warmup_rate: 0.1
    epochs: 5
    max_length: 512
    max_shard_size: 10GB
    dataset_name_list: ['coco', 'music4way_m2t', 'music4way_v2t']
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_originals_files_map_to_drs_fields(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="model.original_config"):
        got = read_original_configs([write(tmp_path, "base.yaml", BASE), write(tmp_path, "stage_2.yaml", STAGE_2)])
    assert got.model == {
        "max_length": 512,
        "encoder_size": "huge",
        "fusion_dropout": 0.1,
        "fusion_layers": 1,
        "lora_r": 32,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
    }
    assert got.train == {
        "seed": 12,
        "max_length": 512,
        "log_every": 5,
        "warmup_rate": 0.1,
        "epochs": 2,
        "datasets": [
            "alpaca",
            "musiccaps",
            "musicqa_mtt",
            "music4way_v2t",
            "music4way_m2t",
            "music4way_i2t",
            "music4way_mi2t",
            "music4way_mv2t",
        ],
    }
    assert got.stage == 2
    assert "num_clip_tokens" in caplog.text and "train.max_shard_size" in caplog.text
    stage1 = read_original_configs([write(tmp_path, "stage_1.yaml", STAGE_1)])
    assert stage1.stage == 1 and stage1.train["epochs"] == 5 and stage1.model == {}


def test_later_files_win_and_the_flag_wins_over_them(tmp_path):
    tuned = write(tmp_path, "mine.yaml", "lora_r: 8\nlora_alpha: 16\n")
    assert read_original_configs([write(tmp_path, "stage_2.yaml", STAGE_2), tuned]).model["lora_alpha"] == 16
    assert read_original_configs([tuned, write(tmp_path, "stage_2.yaml", STAGE_2)]).model["lora_alpha"] == 32
    assert model_config([tuned], None).lora_alpha == 16
    assert model_config([tuned], 4).lora_alpha == 4
    assert model_config(None, None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_rank: 8\n", "unknown key 'lora_rank'"),
        ("train:\n    epoch: 3\n", "unknown key 'train.epoch'"),
        ("train:\n    freeze_lm: true\n", "unknown key 'train.freeze_lm'"),  # the stage is a top-level key
        ("vicuna_version: 13b_v1\n", "vicuna_version '13b_v1': dr builds DeepResonance on 7b_v0 only"),
        ("- lora_r\n", "expected a mapping"),
        ("lora_r: [unclosed\n", "not a readable YAML file"),
    ],
)
def test_what_dr_cannot_take_is_one_line_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        read_original_configs([path])
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_original_format_delta_loads_with_the_alpha_its_config_names(tiny_layout, tmp_path):
    """A rank-8 delta as the original writes it (no dr_config.json) with the stage config it was trained with
    (lora_alpha 16): LoRA's scale is 16 / 8, not the default 32 / 8."""
    from model.config import ModelConfig
    from model.network.checkpoint import load_model, save_delta

    rank8 = load_model(
        tiny_layout.vicuna, None, tiny_layout.imagebind, config=ModelConfig(lora_r=8, encoder_size="tiny")
    )
    folder = save_delta(rank8, tmp_path / "rank8")
    (folder / "dr_config.json").unlink()
    config = model_config([write(tmp_path, "stage.yaml", "lora_r: 8\nlora_alpha: 16\nimagebind_version: tiny\n")], None)
    loaded = load_model(tiny_layout.vicuna, folder, tiny_layout.imagebind, config=config)
    q_proj = loaded.llama_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 16 / 8


@pytest.mark.parametrize("command", [["ask", "Hi"], ["serve"]])
def test_a_config_dr_cannot_take_stops_the_command_before_loading(tmp_path, command):
    from typer.testing import CliRunner

    from deepresonance_cli.app import app

    bad = write(tmp_path, "bad.yaml", "lora_rank: 8\n")
    result = CliRunner().invoke(app, [*command, "--config", str(bad), "--ckpt-root", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "unknown key 'lora_rank'" in result.output
