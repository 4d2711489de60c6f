"""What loading the model from disk costs a `dr infer` process, which `dr bench job` leaves out (it builds random
weights in place): a full-size checkpoint set in the original's layout (a Vicuna-7B-shaped LLaMA in safetensors, an
ImageBind-huge `.pth`, an alpha delta; zeros, with the benchmarks' small tokenizer, so embed_tokens and lm_head are
about 2% of Vicuna's) is written once under --workdir, then each repeat loads it in a fresh process through the
CLI's own loader (deepresonance_cli.infer.load: bf16, LoRA merged), timing its parts: the LLaMA weights, ImageBind,
the delta and the move to the device, and the imports before it. Each repeat loads once in each of --arms, in turns:
`late/N` reads the LLaMA and ImageBind weights in the load and copies them to the device with N threads
(model/io/transfer.py COPY_THREADS; 1: one tensor after another, as Module.to); `early/N` begins their reads onto
the device with N threads each before the model's packages import, as `dr infer` does on a GPU
(model/io/early_read.py). "start to loaded" is the
figure to compare: imports and load together. The first load may read from disk, the later ones from the page
cache, as a second `dr infer` process does.

    PYTHONPATH=. python3 benchmarks/profiling/model_load.py OUT.json [--workdir /tmp/dr_model_load] [--repeats 2] \
        [--arms early/4,late/4,early/8,late/1]
    PYTHONPATH=. python3 benchmarks/profiling/model_load.py OUT.json --tiny  # the CPU check: tiny shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from model.config import LLAMA_TINY, VICUNA_7B

SHARD_BYTES = 2 << 30  # safetensors shards of the LLaMA weights, as save_pretrained writes them (fewer, larger)

# run in a fresh process: the loader's parts timed by wrapping the functions it calls (argv: root, device, threads,
# early: 1 or 0)
LOAD = """
import time
clock = time.perf_counter
start = clock()
import json, sys
from pathlib import Path
import torch
from benchmarks.profiling.startup import timed_calls
import deepresonance_cli.infer as cli
from model.io import early_read, transfer

# early: read (the CPU check too); late: no read at all, not even load()'s own
cli.EARLY_READ_DEVICES = ("cuda", "cpu") if sys.argv[4] == "1" else ()

transfer.COPY_THREADS = int(sys.argv[3])
parts = {}
timed_calls(early_read.EarlyRead, "_read", parts.setdefault("early reads (their threads, summed)", []))
early = cli.read_early(Path(sys.argv[1]), "alpha", None, None, sys.argv[2], "bfloat16") if sys.argv[4] == "1" else None
from deepresonance_cli.infer import load
from model.network import checkpoint
from model.network.deepresonance import DeepResonance

imported = clock() - start
for owner, name, label in (
    (checkpoint, "load_base", "llama weights"),
    (checkpoint, "moved_while", "llama to the device beside imagebind"),
    (transfer, "converted", "llama copied to the device (its thread)"),  # the encoder's own copy is in "imagebind"
    (checkpoint, "load_encoder", "imagebind"),
    (checkpoint, "read_delta", "delta read"),
    (checkpoint, "load_delta", "delta applied"),
    (DeepResonance, "to", "moved to the device"),
    (DeepResonance, "merge_lora", "lora merged"),
):
    timed_calls(owner, name, parts.setdefault(label, []))
begin = clock()
model = load(Path(sys.argv[1]), "alpha", None, None, sys.argv[2], "bfloat16", early=early)
times = {
    "imports (torch, transformers, peft, dr)": round(imported, 3),
    "whole load": round(clock() - begin, 3),
    "start to loaded": round(clock() - start, 3),
    "early reads used": bool(early) and all(read.failed is None for read in early),
}
print(json.dumps(times | {label: round(sum(calls), 3) for label, calls in parts.items()}))
"""


def write_set(root: Path, sizes: dict, encoder_size: str) -> None:
    """The checkpoint set, zeros of the real shapes, in the layout `dr ckpt` writes (once: kept for later runs)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckpt.layout import layout
    from ckpt.tiny import train_tokenizer
    from model.config import ModelConfig
    from model.media.encoder import MediaEncoder
    from model.network.checkpoint import DELTA_ST, delta_state
    from model.network.deepresonance import DeepResonance
    from model.text.tokenizer import PromptTokenizer

    paths = layout(root)
    if (paths.delta_dir("alpha") / DELTA_ST).is_file():
        return
    base_tok = PromptTokenizer(train_tokenizer(root / "tok"), added={})
    config = LlamaConfig(
        **{**sizes, "vocab_size": len(base_tok)}, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
    )
    with init_empty_weights():  # shapes only: parameters on the meta device
        llm = LlamaForCausalLM(config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0  # bytes in the last shard
    for name, param in llm.state_dict().items():
        if filled + param.numel() * 2 > SHARD_BYTES and shards[-1]:
            shards.append({})
            filled = 0
        shards[-1][name] = torch.zeros(param.shape, dtype=torch.bfloat16)
        filled += shards[-1][name].nbytes
    paths.vicuna.mkdir(parents=True, exist_ok=True)
    index = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(paths.vicuna / name), metadata={"format": "pt"})
        index |= dict.fromkeys(shard, name)
        shard.clear()
    total = sum(p.numel() * 2 for p in llm.state_dict().values())
    (paths.vicuna / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config.save_pretrained(paths.vicuna)
    base_tok.save(paths.vicuna)
    with init_empty_weights():
        encoder = MediaEncoder(encoder_size)
    paths.imagebind_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in encoder.imagebind.state_dict().items()}, paths.imagebind
    )
    with init_empty_weights():
        tok = PromptTokenizer(paths.vicuna / "tokenizer.model")
        model = DeepResonance(ModelConfig(variant="alpha", encoder_size=encoder_size), llm, tok, None, encoder.out_dim)
    for name, param in model.named_parameters():  # what a delta can hold (delta_state picks), made real
        if param.requires_grad or not name.startswith("llama_model."):
            set_module_tensor_to_device(model, name, "cpu", torch.zeros(param.shape, dtype=param.dtype))
    state = delta_state(model)
    folder = paths.delta_dir("alpha")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / DELTA_ST))
    model.tokenizer.save(folder)
    config.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--workdir", default="/tmp/dr_model_load")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--arms", default="early/4,late/4,early/8,late/1", help="early|late/threads, comma-separated")
    args = parser.parse_args()
    sizes, encoder, device = (LLAMA_TINY, "tiny", "cpu") if args.tiny else (VICUNA_7B, "huge", "cuda")
    if not torch.cuda.is_available():
        device = "cpu"
    root = Path(args.workdir) / ("tiny" if args.tiny else "7b")
    begin = time.perf_counter()
    write_set(root, sizes, encoder)
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "args": vars(args),
        "set_written_s": round(time.perf_counter() - begin, 1),
        "set_bytes": sum(f.stat().st_size for f in root.rglob("*") if f.is_file()),
        "loads": [],
    }
    arms = [(when, int(n)) for when, n in (arm.split("/") for arm in args.arms.split(","))]
    for _ in range(args.repeats):
        for when, threads in arms:
            begin = time.perf_counter()
            early = "1" if when == "early" else "0"
            out = subprocess.run(
                [sys.executable, "-c", LOAD, str(root), device, str(threads), early], capture_output=True, text=True
            )
            if out.returncode:  # the figures so far kept, the error beside them
                report["error"] = out.stderr[-2000:]
                Path(args.out).write_text(json.dumps(report, indent=1))
                raise SystemExit(out.stderr[-2000:])
            load = {"arm": f"{when}/{threads}", "process_s": round(time.perf_counter() - begin, 2)}
            report["loads"].append(load | json.loads(out.stdout.splitlines()[-1]))
            Path(args.out).write_text(json.dumps(report, indent=1))
    for when, threads in arms:
        starts = [load["start to loaded"] for load in report["loads"] if load["arm"] == f"{when}/{threads}"]
        report[f"median start to loaded, {when}/{threads}"] = statistics.median(starts)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
