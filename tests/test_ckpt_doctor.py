"""`dr ckpt doctor` and `dr ckpt convert` on complete, partial and corrupt layouts built here (hidden 64, enc 32)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from ckpt.doctor import doctor
from ckpt.layout import CkptLayout, layout
from deepresonance_cli.app import app
from model.io.manifest import record_manifest, sha256_file
from model.media.encoder import MediaEncoder

HIDDEN, LAYERS, ENC, RANK, FF = 64, 2, 32, 4, 128
TEXT = [
    "a calm piano piece in c major with a slow tempo",
    "the electric guitar plays a fast rhythm over loud drums",
    "describe the music in detail and name the instruments",
    "a string quartet plays a sad melody in a minor key",
]


def _delta(variant: str, vocab: int) -> dict[str, torch.Tensor]:
    """The original's delta format: LoRA on q/k/v/o, resized embeddings, projector, beta's fusion layer."""
    llm = "llama_model.base_model.model."
    state = {
        f"{llm}model.embed_tokens.weight": torch.randn(vocab, HIDDEN),
        f"{llm}lm_head.weight": torch.randn(vocab, HIDDEN),
        "llama_proj.weight": torch.randn(HIDDEN, ENC),
        "llama_proj.bias": torch.randn(HIDDEN),
    }
    for i in range(LAYERS):
        for proj in "qkvo":
            key = f"{llm}model.layers.{i}.self_attn.{proj}_proj.lora_"
            state[key + "A.default.weight"] = torch.randn(RANK, HIDDEN)
            state[key + "B.default.weight"] = torch.randn(HIDDEN, RANK)
    if variant == "beta":
        p = "preencoding.layers.0."
        shapes = {
            "self_attn.in_proj_weight": (3 * HIDDEN, HIDDEN),
            "self_attn.in_proj_bias": (3 * HIDDEN,),
            "self_attn.out_proj.weight": (HIDDEN, HIDDEN),
            "self_attn.out_proj.bias": (HIDDEN,),
            "linear1.weight": (FF, HIDDEN),
            "linear1.bias": (FF,),
            "linear2.weight": (HIDDEN, FF),
            "linear2.bias": (HIDDEN,),
            "norm1.weight": (HIDDEN,),
            "norm1.bias": (HIDDEN,),
            "norm2.weight": (HIDDEN,),
            "norm2.bias": (HIDDEN,),
        }
        state |= {p + k: torch.randn(s) for k, s in shapes.items()}
    return {k: torch.nn.Parameter(v) for k, v in state.items()}  # the original saved nn.Parameters


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole layout: tiny LLaMA + sentencepiece tokenizer, a small ImageBind state dict, alpha and beta deltas."""
    torch.manual_seed(0)
    paths = layout(tmp_path_factory.mktemp("layout"))
    paths.vicuna.mkdir(parents=True)
    corpus = paths.root / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 5))
    prefix = paths.vicuna / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=60,
        model_type="bpe",
        minloglevel=2,
        user_defined_symbols=["▁###"],  # the piece generation stops on: dr refuses a tokenizer without it
    )
    prefix.with_suffix(".vocab").unlink()
    vocab = spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model"))).get_piece_size()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).save_pretrained(paths.vicuna, max_shard_size="100KB")
    paths.imagebind_dir.mkdir(parents=True)
    torch.save(MediaEncoder("tiny").imagebind.state_dict(), paths.imagebind)  # output dim 32 = ENC
    record_manifest(paths.imagebind_dir, {paths.imagebind.name: _entry(paths.imagebind)})
    for variant in ("alpha", "beta"):
        paths.delta_dir(variant).mkdir(parents=True)
        torch.save(_delta(variant, vocab + 6), paths.delta_dir(variant) / "pytorch_model.pt")
    return paths.root


def _entry(path: Path) -> dict[str, object]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _copy(src: Path, tmp_path: Path) -> CkptLayout:
    shutil.copytree(src, tmp_path / "root")
    return layout(tmp_path / "root")


def _status(root: Path, **kwargs: object) -> dict[str, str]:
    return {c.piece: c.status for c in doctor(root, **kwargs).checks}


def test_complete_layout_is_all_ok(complete: Path) -> None:
    report = doctor(complete)
    assert report.ok, report.checks
    result = CliRunner().invoke(app, ["ckpt", "doctor", "--root", str(complete)])
    assert result.exit_code == 0, result.output
    assert "missing" not in result.output and "fix:" not in result.output


def test_partial_layout_names_the_fixing_commands(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    paths.imagebind.unlink()
    (paths.delta_dir("beta") / "pytorch_model.pt").unlink()
    (paths.vicuna / "tokenizer.model").unlink()
    status = _status(paths.root)
    assert status == {
        "base LLM (Vicuna-7B-v0)": "OK",
        "base tokenizer": "missing",
        "ImageBind-huge": "missing",
        "alpha delta": "OK",
        "beta delta": "missing",
    }
    result = CliRunner().invoke(app, ["ckpt", "doctor", "--root", str(paths.root)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert f"fix: dr ckpt download imagebind --root {paths.root}" in result.output
    assert f"fix: dr ckpt download beta --root {paths.root}" in result.output
    assert f"fix: dr ckpt vicuna --llama LLAMA_7B_HF_DIR --delta lmsys/vicuna-7b-delta-v0 --out {paths.vicuna}" in (
        result.output
    )


def test_missing_shard_and_missing_config(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    next(paths.vicuna.glob("model-*.safetensors")).unlink()
    assert _status(paths.root)["base LLM (Vicuna-7B-v0)"] == "missing"
    (paths.vicuna / "config.json").unlink()
    assert _status(paths.root)["base LLM (Vicuna-7B-v0)"] == "missing"


def test_truncated_delta_is_corrupt(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    delta = paths.delta_dir("alpha") / "pytorch_model.pt"
    delta.write_bytes(delta.read_bytes()[:1000])
    [check] = [c for c in doctor(paths.root).checks if c.piece == "alpha delta"]
    assert check.status == "corrupt" and "truncated or damaged" in check.detail
    assert check.fix == f"dr ckpt download alpha --root {paths.root} --force"


def test_delta_that_does_not_fit_the_base_is_corrupt(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    vocab = LlamaConfig.from_pretrained(paths.vicuna).vocab_size
    torch.save(_delta("beta", vocab + 7), paths.delta_dir("beta") / "pytorch_model.pt")
    state = _delta("alpha", vocab + 6)
    del state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    torch.save(state, paths.delta_dir("alpha") / "pytorch_model.pt")
    checks = {c.piece: c for c in doctor(paths.root).checks}
    beta = checks["beta delta"]
    assert beta.status == "corrupt" and f"model expects ({vocab + 6}, 64)" in beta.detail  # the loader's own words
    assert checks["alpha delta"].status == "corrupt" and "layers.1.self_attn.v_proj" in checks["alpha delta"].detail


def test_beta_delta_in_alpha_place_is_flagged(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    beta = paths.delta_dir("beta") / "pytorch_model.pt"
    (paths.delta_dir("alpha") / "pytorch_model.pt").write_bytes(beta.read_bytes())
    [check] = [c for c in doctor(paths.root).checks if c.piece == "alpha delta"]
    assert check.status == "corrupt" and "beta" in check.detail


def test_recorded_sha256_catches_a_flipped_byte(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    data = bytearray(paths.imagebind.read_bytes())
    data[-200] ^= 0xFF
    paths.imagebind.write_bytes(bytes(data))
    assert _status(paths.root)["ImageBind-huge"] == "corrupt"
    result = CliRunner().invoke(app, ["ckpt", "doctor", "--root", str(paths.root)], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "recorded sha256" in result.output and "--force" in result.output
    paths.imagebind.write_bytes(bytes(data[:-10]))
    assert _status(paths.root, hashes=False)["ImageBind-huge"] == "corrupt"  # sizes are checked without hashing


def test_convert_keeps_keys_and_values_and_doctor_prefers_it(complete: Path, tmp_path: Path) -> None:
    paths = _copy(complete, tmp_path)
    folder = paths.delta_dir("beta")
    old_mask = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["ckpt", "convert", str(folder)])
    finally:
        os.umask(old_mask)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((folder / "delta.safetensors").stat().st_mode) == 0o644  # as open() gives, not 0600
    legacy = torch.load(folder / "pytorch_model.pt", weights_only=True)
    converted = load_file(folder / "delta.safetensors")
    assert converted.keys() == legacy.keys()
    assert all(torch.equal(converted[k], legacy[k]) for k in legacy)
    (folder / "pytorch_model.pt").unlink()
    [check] = [c for c in doctor(paths.root).checks if c.piece == "beta delta"]
    assert check.status == "OK" and check.path.name == "delta.safetensors"


def test_lead_tiny_set_passes(tiny_root: Path) -> None:
    assert doctor(tiny_root).ok
