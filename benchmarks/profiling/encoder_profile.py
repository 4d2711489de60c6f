"""Where an ImageBind call's device time goes, per kind, at a job's call size (CALL_FILES): the preprocessor (the
patch or fbank stem), the trunk and the head, timed apart; the heaviest kernels under torch.profiler; and the trunk
compiled by Inductor against eager (files/s, and how far its features move in bf16); the trunk batch-first
(BatchFirstAttention, dr's) against ImageBind's own seq-first trunk over the same weights; for images and videos, the
patch stem's projection as cuDNN's Conv3d (ImageBind's own) against PatchProjection's matrix product.

The catalog mix's encoder took 7.4 s of a 21.7 s whole job on an H100 at about 350 TFLOP/s of ViT-H work for
videos (benchmarks/results/2026-12-06-h100-encoder-calls/): this says whether that is the trunk's matrix work or
something around it, before anything is changed.

    PYTHONPATH=. python benchmarks/profiling/encoder_profile.py OUT.json [--size huge] [--kinds audio,image,video]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.profiling.encoder_batch import one_input, random_encoder
from model.media.encoder import CALL_FILES, IMAGEBIND_MODALITY, MediaEncoder, PatchProjection, imagebind_model_module


def stem_inputs(encoder: MediaEncoder, modality: str, inputs: torch.Tensor) -> torch.Tensor:
    """A call's inputs as MediaEncoder hands them to the preprocessor: on its device, in its dtype, clips folded into
    the batch."""
    x = inputs.to(encoder.device, encoder.dtype)
    if x.ndim >= 5 and modality != "image":
        x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return x


def parts(encoder: MediaEncoder, modality: str, inputs: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """The call's three stages as closures over the previous stage's output, in the order MediaEncoder runs them."""
    key = IMAGEBIND_MODALITY[modality]
    ib = encoder.imagebind
    x = stem_inputs(encoder, modality, inputs)
    tokens = ib.modality_preprocessors[key](**{key: x})
    features = ib.modality_trunks[key](**tokens["trunk"])
    return [
        ("preprocessor", lambda: ib.modality_preprocessors[key](**{key: x})),
        ("trunk", lambda: ib.modality_trunks[key](**tokens["trunk"])),
        ("head", lambda: ib.modality_heads[key](features, **tokens["head"])),
    ]


def stem_projections(encoder: MediaEncoder, inputs: torch.Tensor, repeats: int) -> dict:
    """The vision stem's projection alone on a call's padded frames: Conv3d (cuDNN) against PatchProjection."""
    pad, projection = encoder.imagebind.modality_preprocessors["vision"].rgbt_stem.proj
    x = inputs.to(encoder.device, encoder.dtype)
    x = pad(x.reshape(-1, *x.shape[-4:]) if x.ndim > 5 else x)
    assert isinstance(projection, PatchProjection)
    conv = device_ms(lambda: F.conv3d(x, projection.weight, projection.bias, projection.stride), repeats)
    linear = device_ms(lambda: projection.patch_product(x), repeats)
    want = F.conv3d(x, projection.weight, projection.bias, projection.stride)
    diff = (want - projection.patch_product(x)).abs().max()
    return {"conv3d_ms": round(conv, 3), "patch_projection_ms": round(linear, 3), "max_abs_diff": float(diff)}


def seq_first_trunk(trunk: nn.Module) -> nn.Module:
    """A copy of a batch-first trunk (model/media/encoder.py's use_batch_first_trunks) as ImageBind builds it: its
    rearrangements to and from [positions, batch, width] and nn.MultiheadAttention over the same weights."""
    ib = imagebind_model_module()
    stock = copy.deepcopy(trunk)
    stock.pre_transformer_layer[-1] = ib.EinOpsRearrange("b l d -> l b d")
    stock.post_transformer_layer = ib.EinOpsRearrange("l b d -> b l d")
    for block in stock.blocks:
        attn = block.attn
        block.attn = ib.MultiheadAttention(
            attn.embed_dim, attn.num_heads, bias=True, add_bias_kv=attn.bias_k is not None, device="meta"
        )
        block.attn.in_proj_weight, block.attn.in_proj_bias = attn.in_proj_weight, attn.in_proj_bias
        block.attn.out_proj, block.attn.bias_k, block.attn.bias_v = attn.out_proj, attn.bias_k, attn.bias_v
    return stock


def trunk_layouts(encoder: MediaEncoder, modality: str, inputs: torch.Tensor, repeats: int) -> dict:
    """The trunk alone on a call's tokens: ImageBind's seq-first layout against dr's batch-first one."""
    key = IMAGEBIND_MODALITY[modality]
    ib = encoder.imagebind
    tokens = ib.modality_preprocessors[key](**{key: stem_inputs(encoder, modality, inputs)})["trunk"]
    ours, stock = ib.modality_trunks[key], seq_first_trunk(ib.modality_trunks[key])
    diff = (ours(**tokens).float() - stock(**tokens).float()).abs().max()
    return {
        "seq_first_ms": round(device_ms(lambda: stock(**tokens), repeats), 2),
        "batch_first_ms": round(device_ms(lambda: ours(**tokens), repeats), 2),
        "max_abs_diff": float(diff),
    }


def device_ms(fn: Callable[[], object], repeats: int) -> float:
    """Mean milliseconds of `fn` between CUDA events (wall time on a CPU), after one warm-up call."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats


def top_kernels(fn: Callable[[], object], count: int = 12) -> list[dict]:
    """The kernels (or CPU ops, without a GPU) that take the most self time over one call."""
    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    device = torch.cuda.is_available()
    events = sorted(
        prof.key_averages(), key=lambda e: e.self_device_time_total if device else e.self_cpu_time_total, reverse=True
    )
    return [
        {
            "name": e.key[:120],
            "calls": e.count,
            "ms": round((e.self_device_time_total if device else e.self_cpu_time_total) / 1000, 3),
        }
        for e in events[:count]
    ]


@torch.no_grad()
def profile_kind(encoder: MediaEncoder, modality: str, x: torch.Tensor, repeats: int, compile_trunk: bool) -> dict:
    """A call of CALL_FILES copies of `x`: stage times, heaviest kernels, the stem both ways, the trunk compiled."""
    files = CALL_FILES[modality]
    inputs = x.unsqueeze(0).expand(files, *x.shape).contiguous()
    stages = {name: round(device_ms(fn, repeats), 2) for name, fn in parts(encoder, modality, inputs)}
    whole = device_ms(lambda: encoder(modality, inputs), repeats)
    entry = {
        "files_a_call": files,
        "input_shape": list(x.shape),
        "stage_ms": stages,
        "call_ms": round(whole, 2),
        "files_per_s": round(files / whole * 1000, 1),
        "top_kernels": top_kernels(lambda: encoder(modality, inputs)),
    }
    entry["trunk_layout"] = trunk_layouts(encoder, modality, inputs, repeats)
    if IMAGEBIND_MODALITY[modality] == "vision":
        entry["stem_projection"] = stem_projections(encoder, inputs, repeats)
    if compile_trunk:
        key = IMAGEBIND_MODALITY[modality]
        trunks = encoder.imagebind.modality_trunks
        eager_trunk, eager_out = trunks[key], encoder(modality, inputs)
        trunks[key] = torch.compile(eager_trunk, dynamic=False)  # images and videos: a graph each
        start = time.perf_counter()
        compiled_out = encoder(modality, inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        build = time.perf_counter() - start
        compiled = device_ms(lambda: encoder(modality, inputs), repeats)
        trunks[key] = eager_trunk
        entry["compiled_trunk"] = {
            "build_s": round(build, 1),
            "call_ms": round(compiled, 2),
            "files_per_s": round(files / compiled * 1000, 1),
            "max_abs_diff": float((compiled_out.float() - eager_out.float()).abs().max()),
        }
    return entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="huge")
    parser.add_argument("--kinds", default="audio,image,video")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor-compiled trunk")
    args = parser.parse_args()
    encoder = random_encoder(args.size)
    device = encoder.device.type
    folder = Path(tempfile.mkdtemp(prefix="dr_encoder_profile_"))
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "size": args.size}
    for modality in args.kinds.split(","):
        x = one_input(folder, modality)
        entry = profile_kind(encoder, modality, x, args.repeats, compile_trunk=not args.no_compile)
        report[modality] = entry
        print(modality, json.dumps({k: v for k, v in entry.items() if k != "top_kernels"}), flush=True)
        for kernel in entry["top_kernels"]:
            print("   ", kernel, flush=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
