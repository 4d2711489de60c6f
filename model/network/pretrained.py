"""The pretrained pieces a DeepResonance model is built on, as their files hold them: the LLaMA (from its Hugging Face
folder, or from the tensors read early onto its device) and ImageBind (checked against the model its shapes declare).
A piece that does not load is one DeltaError line naming its file."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, modeling_utils
from transformers.utils import GENERATION_CONFIG_NAME

from model.io.early_read import EarlyRead, early_for
from model.media.encoder import MediaEncoder, size_of


class DeltaError(ValueError):
    pass


def pretrained_llm(
    folder: Path, dtype: torch.dtype, attn_implementation: str, early: EarlyRead | None = None
) -> LlamaForCausalLM:
    """`LlamaForCausalLM.from_pretrained(folder)`, built from the tensors `early` read from this folder onto its
    device: the same model (config, weights, generation settings), its weights already there. Without a read, or
    where it failed, from the folder, which names what is wrong with it."""
    state = early.take() if early is not None else None
    if state is None:
        return LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    with no_allocator_warmup():
        llm = LlamaForCausalLM.from_pretrained(
            None,
            config=LlamaConfig.from_pretrained(folder),
            state_dict=state,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map={"": early.device},
        )
    if (folder / GENERATION_CONFIG_NAME).is_file():  # what from_pretrained(folder) reads beside the weights
        llm.generation_config = GenerationConfig.from_pretrained(folder)
    return llm


@contextmanager
def no_allocator_warmup() -> Iterator[None]:
    """transformers' `from_pretrained` with a device map first reserves the model's size on the card
    (`caching_allocator_warmup`, to save allocations while it copies weights there); beside weights already read onto
    the card that is their size again, 27 GB in all for Vicuna-7B, past a 24 GB card. Here nothing is copied."""
    warmup = modeling_utils.caching_allocator_warmup
    modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_utils.caching_allocator_warmup = warmup


def load_base(
    base: Path,
    dtype: torch.dtype,
    attn_implementation: str,
    device: str | torch.device = "cpu",
    early: Sequence[EarlyRead] = (),
) -> LlamaForCausalLM:
    """The Vicuna weights (from `early`'s read of `base` onto `device`, if there is one); a damaged or code-holding
    file is one line naming it (checked by ckpt's readers)."""
    try:
        return pretrained_llm(base, dtype, attn_implementation, early_for(early, base, device, dtype))
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError) as err:
        from model.io.errors import CkptError
        from model.io.weights import ShardedWeights

        try:
            ShardedWeights(base).shapes()
        except CkptError as found:
            raise DeltaError(str(found)) from err
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DeltaError(f"{base}: the base model does not load ({type(err).__name__}: {reason})") from err


def imagebind_problems(path: Path) -> list[str]:
    """Why an ImageBind file does not fit the model it declares (its size read from its shapes): unreadable, missing,
    unexpected or misshapen keys. The one check behind `load_model` and `dr ckpt doctor`."""
    from model.io.errors import CkptError
    from model.io.weights import tensor_shapes

    try:
        shapes = tensor_shapes(path)
    except CkptError as err:
        return [str(err).removeprefix(f"{path}: ")]
    try:
        size = size_of({k: SimpleNamespace(shape=s) for k, s in shapes.items()}, path)
    except ValueError as err:
        return [str(err).removeprefix(f"{path}: ")]
    with init_empty_weights():  # shapes only: parameters on the meta device, nothing allocated
        own = {k: tuple(v.shape) for k, v in MediaEncoder(size).imagebind.state_dict().items()}
    problems = [f"unexpected key '{k}' for ImageBind-{size}" for k in shapes if k not in own]
    problems += [f"missing key '{k}' for ImageBind-{size}" for k in own if k not in shapes]
    problems += [
        f"'{k}' has shape {shapes[k]}, ImageBind-{size} expects {s}"
        for k, s in own.items()
        if k in shapes and shapes[k] != s
    ]
    return problems


def load_encoder(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, early: Sequence[EarlyRead] = ()
) -> MediaEncoder:
    """ImageBind from `path` (from `early`'s read of it onto `device`, if there is one), checked first against the
    model its shapes declare."""
    if path.is_file():
        problems = imagebind_problems(path)
        if problems:
            raise DeltaError(f"{path}: {problems[0]}")
    return MediaEncoder.load(path, device=device, dtype=dtype, early=early_for(early, path, device, dtype))
