"""Vicuna-7B-v0 = LLaMA-7B + lmsys/vicuna-7b-delta-v0, merged tensor by tensor.

FastChat's `apply_delta` loads both models whole (two 7B models in RAM, ~27 GB in fp16). Here each output tensor is
computed from one base and one delta tensor, and each output shard is built and saved before the next one, so memory
holds one output shard (`max_shard_bytes`, 2 GiB by default) plus one memory-mapped pickled input shard, which is
file-backed and reclaimable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open
from safetensors.torch import save_file

from ckpt.files import byte_progress
from ckpt.layout import HF_WEB, VICUNA_DELTA_REPO
from model.io.errors import CkptError
from model.io.files import hub_offline, temporary_folder, umask_mode
from model.io.manifest import MANIFEST_FILE, record_manifest, sha256_file
from model.io.weights import ShardedWeights, tensor_shapes

# The delta's vocabulary has one row more than LLaMA's (32001 vs 32000: the [PAD] token Vicuna v0 added).
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# Older conversions saved RoPE's inv_freq buffer; it is recomputed from the config, so it is not merged.
SKIPPED_SUFFIX = "rotary_emb.inv_freq"
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",
)
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}  # as safetensors headers name them


def merge_tensor(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + delta in `dtype`; a larger delta vocabulary keeps its extra rows as they are.

    FastChat v0.1.10 resizes LLaMA's embeddings to the delta's 32001 rows with zeros in the new row, then adds the
    delta: the same as adding the base into the delta's first rows, which is what this does.
    """
    out = delta.to(dtype, copy=True)
    out[tuple(slice(0, n) for n in base.shape)] += base.to(dtype)
    return out


def resolve_delta(delta: str | Path) -> Path:
    """A local delta folder as is, or a hub model repo id fetched (resumably) into the huggingface_hub cache."""
    if Path(delta).is_dir():
        return Path(delta)
    from huggingface_hub import HfApi, snapshot_download

    from model.io.http import failure, retrying, timeouts

    repo = str(delta)
    by_hand = f"download {HF_WEB}/{repo} by hand and pass its folder as --delta DIR"
    if hub_offline():  # at once: huggingface_hub would retry a dead network for half a minute first
        raise CkptError(f"could not fetch the Vicuna delta {repo}: offline (HF_HUB_OFFLINE=1); {by_hand}")

    def fetch() -> Path:
        files = HfApi().list_repo_files(repo)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        patterns = ["*.json", "*.model", weights]
        return Path(snapshot_download(repo, allow_patterns=patterns, etag_timeout=timeouts()[1]))

    try:
        return retrying(fetch)
    except Exception as e:
        raise CkptError(f"could not fetch the Vicuna delta {repo} ({failure(e)}); {by_hand}") from e


def _plan(base: ShardedWeights, delta: ShardedWeights) -> dict[str, tuple[int, ...]]:
    """The output tensors (the delta's names, order and shapes), after checking the two models fit together."""
    base_shapes = {k: v for k, v in base.shapes().items() if not k.endswith(SKIPPED_SUFFIX)}
    delta_shapes = {k: v for k, v in delta.shapes().items() if not k.endswith(SKIPPED_SUFFIX)}
    only_base, only_delta = base_shapes.keys() - delta_shapes, delta_shapes.keys() - base_shapes
    if only_base or only_delta:
        raise CkptError(
            f"LLaMA and the delta hold different tensors (only in LLaMA: {sorted(only_base)[:3]}, "
            f"only in the delta: {sorted(only_delta)[:3]}); is --llama a LLaMA-7B HF folder?"
        )
    for name, shape in delta_shapes.items():
        b = base_shapes[name]
        grows_vocab = name in VOCAB_TENSORS and len(b) == len(shape) and shape[0] >= b[0] and shape[1:] == b[1:]
        if b != shape and not grows_vocab:
            raise CkptError(f"{name}: LLaMA has shape {b}, the delta {shape}; they do not belong together")
    return delta_shapes


def _shards(plan: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in plan.items():
        n = itemsize * _numel(shape)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def merge_vicuna(
    llama: Path,
    delta: str | Path = VICUNA_DELTA_REPO,
    out: Path = Path("ckpt/pretrained_ckpt/vicuna_ckpt/7b_v0"),
    *,
    dtype: str = "float16",
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
    console: Console | None = None,
) -> Path:
    """Build Vicuna-v0 in `out`: safetensors shards + index, the delta's config and tokenizer, a sha256 manifest.

    The result is written to a temporary sibling folder and renamed once every shard has been re-read and checked, so
    `out` never holds a half-written model. fp16 by default, as FastChat produced it.
    """
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CkptError(f"{out} already exists and is not empty; pass --overwrite to rebuild it")
    torch_dtype = DTYPES[dtype]
    delta_dir = resolve_delta(delta)
    base_w, delta_w = ShardedWeights(llama), ShardedWeights(delta_dir)
    if not (delta_dir / "config.json").is_file():
        raise CkptError(f"{delta_dir} has no config.json; is --delta the Vicuna delta folder?")
    plan = _plan(base_w, delta_w)
    groups = _shards(plan, torch_dtype.itemsize, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

    tmp = temporary_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(torch_dtype.itemsize * _numel(s) for s in plan.values())
    with byte_progress(console) as progress:
        task = progress.add_task("merge LLaMA + delta", total=total)

        for file, group in zip(names, groups, strict=True):
            shard: dict[str, torch.Tensor] = {}
            for name in group:
                shard[name] = merge_tensor(base_w.get(name), delta_w.get(name), torch_dtype)
                progress.advance(task, shard[name].nbytes)
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            umask_mode(tmp / file)
            del shard  # now: the last one would otherwise stay alive through the verification below
        base_w.release()
        delta_w.release()
        weight_map = {n: file for file, group in zip(names, groups, strict=True) for n in group}
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        _write_config(delta_dir / "config.json", tmp / "config.json", dtype)
        for extra in COPIED_FILES:
            if (delta_dir / extra).is_file():
                shutil.copyfile(delta_dir / extra, tmp / extra)
        verify_merged(tmp, plan, torch_dtype)
        record_manifest(tmp, {p.name: _entry(p, progress) for p in sorted(tmp.iterdir()) if p.name != MANIFEST_FILE})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _entry(path: Path, progress: Progress) -> dict[str, object]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path, progress)}


def _write_config(src: Path, dst: Path, dtype: str) -> None:
    config = json.loads(src.read_text())
    config["torch_dtype"] = dtype
    dst.write_text(json.dumps(config, indent=2) + "\n")


def verify_merged(folder: Path, plan: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    """Re-read every written shard's header: the planned tensors, shapes and dtype, nothing more or less."""
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    found: dict[str, tuple[int, ...]] = {}
    for file in dict.fromkeys(weight_map.values()):
        found |= tensor_shapes(folder / file)
    if found != plan:
        wrong = sorted(k for k in plan.keys() | found.keys() if plan.get(k) != found.get(k))
        raise CkptError(f"merged model in {folder} does not match the plan: {wrong[:5]}")
    for file in dict.fromkeys(weight_map.values()):
        with safe_open(str(folder / file), framework="pt") as f:
            bad = [k for k in f.keys() if f.get_slice(k).get_dtype() != ST_DTYPES[dtype]]
        if bad:
            raise CkptError(f"{file}: tensors not in {dtype}: {bad[:3]}")
