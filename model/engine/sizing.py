"""How big an engine is: positions per slot, slots that fit in the device's memory, and whether a row fits a slot.

Every caller sizes through here (a job, a server, `dr ask`), so the rounding, the memory share and the int32 bound
are applied the same way everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch

from model.config import GenerationConfig
from model.engine.kv_cache import BLOCK, bytes_per_position, int32_slot_limit
from model.network.deepresonance import DeepResonance

MEMORY_SHARE = 0.8  # of the free device memory (after the weights) the slot cache may take
# rows decoding together by default: on CUDA a job fills the device (11.7 ms a step at 256 slots on an H200, 6.6 ms
# at 64: throughput grows with slots), a server and an evaluation keep 64 (a server's latency, an evaluation's
# likelihood batches); on a CPU, 8
CUDA_SLOTS = {"job": 256, "server": 64, "eval": 64}
CPU_SLOTS = 8
# a slot count that the memory bounds is rounded down to a multiple of this: the compiled step is built for its
# shapes (slots x positions), and a count that followed the free memory to the slot would rarely repeat from one run
# or dataset to the next, so each job would compile again instead of loading from the compile cache
SLOT_STEP = 32


def default_slots(device: str, use: Literal["job", "server", "eval"]) -> int:
    """Rows decoding together when the user names no number: `use`'s CUDA count on a CUDA device, else CPU_SLOTS."""
    return CUDA_SLOTS[use] if device.startswith("cuda") else CPU_SLOTS


def fit_slots(length: int, per_position: int, budget: int, most: int) -> int:
    """Slots of `length` positions that fit in `budget` bytes (at most `most`; 0 if not even one fits)."""
    return max(0, min(most, budget // (length * per_position)))


def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    """Positions per slot: the longest prompt and answer, rounded up to FlexAttention's block."""
    return -(-(longest_prompt + max_new_tokens) // BLOCK) * BLOCK


def fits_slot(prompt_positions: int, max_new_tokens: int, length: int) -> bool:
    """Whether a prompt and its token budget fit in a slot of `length` positions."""
    return prompt_positions + max_new_tokens <= length


def memory_budget(model: DeepResonance) -> int | None:
    """Bytes the slot cache may use on CUDA (a share of free memory); None on CPU (no fixed bound)."""
    device = model.llama_model.device
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0] * MEMORY_SHARE)


def engine_size(model: DeepResonance, longest_prompt: int, max_new_tokens: int, most_slots: int) -> tuple[int, int]:
    """(slots, positions per slot) of an engine for prompts of up to `longest_prompt` positions and answers of up to
    `max_new_tokens`: as many slots as fit in the memory budget, at most `most_slots`, a count the memory bounds
    rounded down to a multiple of SLOT_STEP. Raises MemoryError with one line if not one fits."""
    length = cache_length(longest_prompt, max_new_tokens)
    budget = memory_budget(model)
    if budget is None:
        return most_slots, length
    config = model.llama_model.config
    per = bytes_per_position(config, model.dtype)
    slots = fit_slots(length, per, budget, min(most_slots, int32_slot_limit(config, length)))
    if not slots:
        raise MemoryError(
            f"one row of {length} positions needs {length * per / 2**30:.1f} GiB of cache; {budget / 2**30:.1f} GiB "
            "is free for it: lower --max-new-tokens or free GPU memory"
        )
    if slots < most_slots and slots > SLOT_STEP:
        slots -= slots % SLOT_STEP
    return slots, length


def top_k_cap(model: DeepResonance, gen: GenerationConfig) -> int:
    """The candidates an engine for `gen` keeps per row: 1 when greedy (a plain argmax), top-k when sampling with it,
    the whole vocabulary when top-k is off."""
    if not gen.do_sample:
        return 1
    return gen.top_k if gen.top_k > 0 else len(model.tokenizer)
