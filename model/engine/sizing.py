"""How big an engine is: positions per row, rows decoding together, cache blocks that fit in the device's memory, and
whether a row fits.

Every caller sizes through here (a job, a server, `dr ask`), so the rounding, the memory share and the int32 bound
are applied the same way everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch

from model.config import GenerationConfig
from model.engine.kv_cache import BLOCK, bytes_per_position, int32_position_limit
from model.network.deepresonance import DeepResonance

MEMORY_SHARE = 0.8  # of the device's memory beyond the model's weights, the share the cache's pool may take
# rows decoding together by default: on CUDA a job fills the device (throughput grows with slots: on an H100, 512
# slots against 256 gave 13,421 / 6,550 / 8,589 useful tok/s on short / long / varied prompts against 11,928 / 6,480
# / 8,017, benchmarks/results/2026-12-06-h100-pipeline-measured/), a server and an evaluation keep 64 (a server's
# latency, an evaluation's likelihood batches); on a CPU, 8
CUDA_SLOTS = {"job": 512, "server": 64, "eval": 64}
CPU_SLOTS = 8
# the pool's block count is rounded down to a multiple of this: the compiled step is built for its shapes, and a count
# that followed the free memory to the block would rarely repeat from one run or dataset to the next, so each job
# would compile again instead of loading from the compile cache
BLOCK_STEP = 64


def default_slots(device: str, use: Literal["job", "server", "eval"]) -> int:
    """Rows decoding together when the user names no number: `use`'s CUDA count on a CUDA device, else CPU_SLOTS."""
    return CUDA_SLOTS[use] if device.startswith("cuda") else CPU_SLOTS


def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    """Positions a row may hold: the longest prompt and answer, in FlexAttention's blocks, their count rounded up to a
    power of two (the step's block table is this wide: few widths, so that jobs on other datasets share compiled
    steps; a row's memory is the blocks it fills, whatever this allows)."""
    blocks = -(-(longest_prompt + max_new_tokens) // BLOCK)
    return BLOCK * (1 << (blocks - 1).bit_length())


def fits_slot(prompt_positions: int, max_new_tokens: int, length: int) -> bool:
    """Whether a prompt and its token budget fit in a row of `length` positions."""
    return prompt_positions + max_new_tokens <= length


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers on a CUDA device (the LLM, its encoder, projector and fusion)."""
    tensors = (*model.parameters(), *model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def memory_budget(model: DeepResonance) -> int | None:
    """Bytes the cache's pool may use on CUDA; None on CPU (no fixed bound).

    MEMORY_SHARE of the device's memory beyond the model's own weights: the same for one model on one kind of card in
    every process and in every job of a process. The pool is a shape of the compiled step, and a budget that followed
    the free memory changed with whatever else was alive: two jobs of one H200 process got 6,400 and 6,336 blocks,
    and the second compiled its step anew (16 s to its first rows: benchmarks/results/2026-12-07-h200-next3/). Where
    less is free than that budget leaves room beside (another process on the card, an earlier engine still alive:
    under half the other share), the pool takes MEMORY_SHARE of what is free instead. The allocator's cached blocks
    are handed back first, so they do not count as taken."""
    device = model.llama_model.device
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    beyond_weights = total - resident_bytes(model)
    budget = int(beyond_weights * MEMORY_SHARE)
    if free - budget >= beyond_weights * (1 - MEMORY_SHARE) / 2:
        return budget
    return int(free * MEMORY_SHARE)


def engine_size(
    model: DeepResonance, longest_prompt: int, max_new_tokens: int, most_slots: int
) -> tuple[int, int, int | None]:
    """(slots, positions per row, pool blocks) of an engine for prompts of up to `longest_prompt` positions and
    answers of up to `max_new_tokens`: `most_slots` rows, and as many cache blocks as fit in the memory budget (a
    multiple of BLOCK_STEP), but no more than every slot's longest row could fill (a 64-slot server does not take the
    whole device); None on a CPU: the engine's default. Raises MemoryError with one line if the longest row does not
    fit."""
    length = cache_length(longest_prompt, max_new_tokens)
    budget = memory_budget(model)
    if budget is None:
        return most_slots, length, None
    config = model.llama_model.config
    per_block = BLOCK * bytes_per_position(config, model.dtype)
    blocks = min(budget // per_block, int32_position_limit(config) // BLOCK)
    if blocks > BLOCK_STEP:
        blocks -= blocks % BLOCK_STEP
    need = -(-(longest_prompt + max_new_tokens) // BLOCK) + 1  # the longest row and the scratch block
    if blocks < need:
        raise MemoryError(
            f"one row of {longest_prompt + max_new_tokens} positions needs {need * per_block / 2**30:.1f} GiB of "
            f"cache; {budget / 2**30:.1f} GiB is free for it: lower --max-new-tokens or free GPU memory"
        )
    slots = min(most_slots, blocks - 1)
    return slots, length, min(blocks, slots * (length // BLOCK) + 1)  # no more than every slot's longest row


def top_k_cap(model: DeepResonance, gen: GenerationConfig) -> int:
    """The candidates an engine for `gen` keeps per row: 1 when greedy (a plain argmax), top-k when sampling with it,
    the whole vocabulary when top-k is off."""
    if not gen.do_sample:
        return 1
    return gen.top_k if gen.top_k > 0 else len(model.tokenizer)
