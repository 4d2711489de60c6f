"""`dr ckpt vicuna` on tiny LLaMA folders: base + delta = target, vocab mismatch, sharding, bounded memory."""

from __future__ import annotations

import json
import os
import stat
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import ckpt.vicuna as vicuna
import model.io.weights as weights
from ckpt.vicuna import merge_vicuna
from deepresonance_cli.app import app
from model.io.errors import CkptError
from model.io.manifest import read_manifest, sha256_file

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
BASE_VOCAB, DELTA_VOCAB = 100, 101


def _model(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **TINY)
    return LlamaForCausalLM(config).eval()


def _save_bin_shards(state: dict[str, torch.Tensor], folder: Path, per_shard: int) -> None:
    """A delta the way lmsys published it: pickled .bin shards plus pytorch_model.bin.index.json."""
    names = list(state)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({n: state[n].clone() for n in group}, folder / file)
        weight_map |= dict.fromkeys(group, file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """LLaMA (safetensors, several shards), a Vicuna-like target with one more vocab row, and their delta (.bin)."""
    root = tmp_path_factory.mktemp("vicuna")
    base, target = _model(BASE_VOCAB, 0), _model(DELTA_VOCAB, 1)
    base.save_pretrained(root / "llama", max_shard_size="100KB")
    base_sd, target_sd = base.state_dict(), target.state_dict()
    delta = {}
    for name, t in target_sd.items():
        d = t.clone()
        b = base_sd[name]
        d[tuple(slice(0, n) for n in b.shape)] -= b
        delta[name] = d
    (root / "delta").mkdir()
    _save_bin_shards(delta, root / "delta", per_shard=2)
    target.config.save_pretrained(root / "delta")
    (root / "delta" / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    (root / "delta" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return {"root": root, "base": base_sd, "target": target, "delta": delta}


def test_merge_equals_target_in_float32(folders: dict, tmp_path: Path) -> None:
    out = merge_vicuna(folders["root"] / "llama", folders["root"] / "delta", tmp_path / "vicuna", dtype="float32")
    merged = LlamaForCausalLM.from_pretrained(out).eval()
    assert merged.config.vocab_size == DELTA_VOCAB
    for name, want in folders["target"].state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], want, rtol=0, atol=1e-6)
    ids = torch.tensor([[1, 5, 99, 100]])  # 100: the row only the delta has
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, folders["target"](ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"
    assert (out / "tokenizer_config.json").is_file()


def test_merge_fp16_matches_fastchat(folders: dict, tmp_path: Path) -> None:
    """FastChat v0.1.10: base in fp16, embeddings resized with zero rows, then `param += delta` in fp16."""
    out = merge_vicuna(folders["root"] / "llama", folders["root"] / "delta", tmp_path / "vicuna")
    shards = weights.ShardedWeights(out)
    for name, d in folders["delta"].items():
        b = folders["base"][name].half()
        resized = torch.zeros_like(d, dtype=torch.float16)
        resized[tuple(slice(0, n) for n in b.shape)] = b
        resized += d.half()
        got = shards.get(name)
        assert got.dtype == torch.float16
        assert torch.equal(got, resized), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_output_is_sharded_indexed_and_checksummed(folders: dict, tmp_path: Path) -> None:
    old_mask = os.umask(0o022)
    try:
        out = merge_vicuna(
            folders["root"] / "llama", folders["root"] / "delta", tmp_path / "vicuna", max_shard_bytes=60_000
        )
    finally:
        os.umask(old_mask)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert {stat.S_IMODE((out / f).stat().st_mode) for f in files} == {0o644}  # as open() gives, not 0600
    assert set(index["weight_map"]) == set(folders["delta"])
    for file in files:  # each shard holds exactly its indexed tensors, each = base + delta in fp16
        shard = load_file(out / file)
        assert set(shard) == {name for name, f in index["weight_map"].items() if f == file}
        for name, got in shard.items():
            d, b = folders["delta"][name], folders["base"][name]
            want = d.half().clone()
            want[tuple(slice(0, n) for n in b.shape)] += b.half()
            assert got.dtype == torch.float16 and torch.equal(got, want), name
    assert index["metadata"]["total_size"] == sum(2 * t.numel() for t in folders["delta"].values())
    manifest = read_manifest(out)
    assert set(files) | {"config.json", "tokenizer.model"} <= set(manifest)
    for file in files:
        assert manifest[file]["sha256"] == sha256_file(out / file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vicuna"]  # no temporary folder left beside it


def test_peak_memory_stays_near_one_shard(folders: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the bytes of every tensor the merge loads or creates while it is alive: one input shard, one output
    shard and the tensors being merged, never two whole models."""
    live: dict[int, int] = {}
    peak = [0]

    def track(t: torch.Tensor) -> None:
        if id(t) not in live:
            live[id(t)] = t.nbytes
            weakref.finalize(t, live.pop, id(t), None)
        peak[0] = max(peak[0], sum(live.values()))

    load_pickle, get, merge_tensor = weights.load_pickle, weights.ShardedWeights.get, vicuna.merge_tensor

    def tracked_load(path: Path) -> dict[str, torch.Tensor]:
        state = load_pickle(path)
        for t in state.values():
            track(t)
        return state

    def tracked_get(self: weights.ShardedWeights, name: str) -> torch.Tensor:
        t = get(self, name)
        track(t)
        return t

    def tracked_merge(b: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = merge_tensor(b, d, dtype)
        track(out)
        return out

    monkeypatch.setattr(weights, "load_pickle", tracked_load)
    monkeypatch.setattr(weights.ShardedWeights, "get", tracked_get)
    monkeypatch.setattr(vicuna, "merge_tensor", tracked_merge)
    root = folders["root"]
    out = merge_vicuna(root / "llama", root / "delta", tmp_path / "vicuna", dtype="float32", max_shard_bytes=60_000)

    out_files = sorted(out.glob("*.safetensors"))
    largest_out = max(sum(t.nbytes for t in load_file(f).values()) for f in out_files)
    delta_files = sorted((folders["root"] / "delta").glob("*.bin"))
    largest_shard = max(sum(t.nbytes for t in torch.load(f, weights_only=True).values()) for f in delta_files)
    largest_tensor = max(t.nbytes for t in folders["delta"].values())
    one_model = sum(t.nbytes for t in folders["delta"].values())
    assert len(delta_files) > 3 and len(out_files) > 3
    assert peak[0] <= largest_shard + largest_out + 2 * largest_tensor
    assert peak[0] < one_model / 2


def test_rejects_mismatched_models(folders: dict, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    config = LlamaConfig(vocab_size=BASE_VOCAB, tie_word_embeddings=False, **{**TINY, "intermediate_size": 96})
    LlamaForCausalLM(config).save_pretrained(wrong)
    with pytest.raises(CkptError, match="do not belong together"):
        merge_vicuna(wrong, folders["root"] / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_without_flag(folders: dict, tmp_path: Path) -> None:
    out = tmp_path / "vicuna"
    args = ["ckpt", "vicuna", "--llama", str(folders["root"] / "llama"), "--delta", str(folders["root"] / "delta")]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--out", str(out)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--out", str(out), "--overwrite"]).exit_code == 0


def test_hub_repo_id_fetches_only_configs_tokenizer_and_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, with the hub's calls stubbed
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "list_repo_files",
        lambda self, repo: ["config.json", "pytorch_model-00001-of-00002.bin", "README.md"],
    )
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, allow_patterns, **_: calls.append((repo, allow_patterns)) or str(tmp_path),
    )
    assert vicuna.resolve_delta("lmsys/vicuna-7b-delta-v0") == tmp_path
    assert calls == [("lmsys/vicuna-7b-delta-v0", ["*.json", "*.model", "*.bin"])]


def test_unreachable_hub_repo_says_how_to_place_the_delta(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def offline(self, repo):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    with pytest.raises(CkptError, match="by hand and pass its folder as --delta DIR"):
        vicuna.resolve_delta("lmsys/vicuna-7b-delta-v0")
