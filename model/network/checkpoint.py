"""Delta checkpoints in the original's format, and building a ready model from base + delta folders.

A delta (`pytorch_model.pt`) is a flat dict of the parameters that trained: LoRA A/B, the resized embed_tokens and
lm_head, `llama_proj.*`, and for beta `preencoding.*`. Loading is strict: every key must exist in the model with the
same shape, and the LoRA rank and fusion depth are read from the delta, never assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import ENCODER_SIZES, ModelConfig
from model.io.early_read import EarlyRead, early_for
from model.io.files import umask_mode, written_atomically
from model.io.transfer import moved_while
from model.media.encoder import MediaEncoder, file_fingerprint
from model.network.deepresonance import DeepResonance
from model.network.folders import EXPORT_INFO, EXPORT_LLM, EXPORT_MM, exported
from model.network.pretrained import DeltaError, load_base, load_encoder, pretrained_llm
from model.text.tokenizer import PromptTokenizer

DELTA_PT = "pytorch_model.pt"
DELTA_ST = "delta.safetensors"
DR_CONFIG = "dr_config.json"
PROJ_KEY = "llama_proj.weight"
LORA_KEY = re.compile(r"\.layers\.\d+\..*\.lora_[AB]\.")
FUSION_LAYER = re.compile(r"^preencoding\.layers\.(\d+)\.")
# stage-1 deltas of the original have no LoRA wrapper in their names
LEGACY_PREFIXES = {
    "llama_model.model.": "llama_model.base_model.model.model.",
    "llama_model.lm_head.": "llama_model.base_model.model.lm_head.",
}

log = logging.getLogger(__name__)


def read_delta(folder: str | Path) -> dict[str, torch.Tensor]:
    """The delta tensors of a folder; safetensors when present, else the pickle loaded with weights_only."""
    from model.io.errors import CkptError
    from model.io.weights import load_pickle, safetensors_file

    folder = Path(folder)
    path = delta_file(folder)
    if not path.is_file():
        raise DeltaError(f"{folder}: no {DELTA_PT} or {DELTA_ST} (run `dr ckpt download`)")
    try:
        state = safetensors_file(path) if path.name == DELTA_ST else load_pickle(path)
    except CkptError as err:
        raise DeltaError(str(err)) from err
    return {_modern_key(k): v.detach() for k, v in state.items()}


def read_config(path: Path, base: ModelConfig) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), base=base)
    except (ValueError, TypeError, AttributeError) as err:  # garbled JSON, a list, unknown or mistyped fields
        raise DeltaError(f"{path}: not a dr model config ({' '.join(str(err).split())})") from err


def delta_file(folder: str | Path) -> Path:
    """The file `read_delta` reads: safetensors when present, else the pickle."""
    folder = Path(folder)
    return folder / DELTA_ST if (folder / DELTA_ST).is_file() else folder / DELTA_PT


def fingerprint(files: list[Path]) -> str:
    """sha256 over the files' contents, taken from the download manifest when it recorded this very size."""
    from model.io.manifest import read_manifest, sha256_file

    digest = hashlib.sha256()
    for path in files:
        recorded = read_manifest(path.parent).get(path.name, {})
        same = recorded.get("size") == path.stat().st_size and recorded.get("sha256")
        digest.update((same or sha256_file(path)).encode())
    return digest.hexdigest()[:16]


def delta_config(state: Mapping[str, torch.Tensor | tuple[int, ...]], base: ModelConfig) -> ModelConfig:
    """Variant, LoRA rank and fusion depth as the delta holds them (tensors, or their shapes)."""
    fusion_layers = {int(m.group(1)) for k in state if (m := FUSION_LAYER.match(k))}
    lora_a = [tuple(getattr(v, "shape", v)) for k, v in state.items() if ".lora_A." in k]
    variant = "beta" if fusion_layers else "alpha"
    return replace(
        base,
        variant=variant,
        fusion_layers=max(fusion_layers) + 1 if fusion_layers else base.fusion_layers,
        lora_r=lora_a[0][0] if lora_a else base.lora_r,
    )


def delta_problems(delta: Mapping[str, tuple[int, ...]], own: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Why a delta (key -> shape) does not fit a model (key -> shape): unexpected, misshapen or missing keys.

    The one check of a delta's keys: `load_delta` raises the first problem, `dr ckpt doctor` reports them against the
    same model built on the meta device, so the two never disagree.
    """
    problems = []
    for key, shape in delta.items():
        if key not in own:
            problems.append(f"unexpected key '{key}'")
        elif tuple(own[key]) != tuple(shape):
            problems.append(f"'{key}' has shape {tuple(shape)}, model expects {tuple(own[key])}")
    required = [k for k in own if k.startswith(("llama_proj.", "preencoding."))]
    if any(LORA_KEY.search(k) for k in delta):
        required += [k for k in own if LORA_KEY.search(k)]
    problems += [f"missing key '{key}'" for key in required if key not in delta]
    return problems


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating tensors holding NaN or infinity (a diverged run saves them; they decode to empty answers)."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_delta(model: DeepResonance, state: dict[str, torch.Tensor], source: str = "delta") -> None:
    """Copies a delta into the model; a missing, unexpected or misshapen key, or a NaN, is an error naming it."""
    own = model.state_dict()
    problems = delta_problems(
        {k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in own.items()}
    )
    if problems:
        raise DeltaError(f"{source}: {problems[0]}")
    bad = non_finite(state)
    if bad:
        raise DeltaError(
            f"{source}: {len(bad)} tensor(s) hold NaN or infinite values (first: '{bad[0]}'): a diverged run?"
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def delta_state(model: DeepResonance) -> OrderedDict[str, torch.Tensor]:
    """What the original saves: trainable parameters plus the projector and fusion, under the model's names."""
    out = OrderedDict()
    for name, param in model.named_parameters():
        if name.startswith("visual_encoder."):
            continue
        if param.requires_grad or name.startswith(("llama_proj.", "preencoding.")):
            out[name] = param.detach().cpu().contiguous()
    return out


def save_delta(model: DeepResonance, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Writes `pytorch_model.pt` (loadable by the original), `delta.safetensors` (with `metadata` in its header:
    training records its run id and step there), tokenizer, LLaMA config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = delta_state(model)
    with written_atomically(folder / DELTA_PT) as tmp:
        torch.save(state, tmp)
    with written_atomically(folder / DELTA_ST) as tmp:
        save_file(dict(state), str(tmp), metadata=metadata)
    model.tokenizer.save(folder)
    model.llama_model.config.save_pretrained(folder)
    (folder / DR_CONFIG).write_text(json.dumps(asdict(model.config), indent=2))
    return folder


def export_model(model: DeepResonance, out: str | Path, imagebind: str | Path | None) -> Path:
    """A standalone folder: LoRA merged into LLaMA (HF safetensors), projector/fusion, and the encoder reference."""
    out = Path(out)
    model.merge_lora()
    model.llama_model.save_pretrained(out / EXPORT_LLM)
    model.tokenizer.save(out / EXPORT_LLM)
    mm = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("llama_proj.", "preencoding."))
    }
    save_file(mm, str(out / EXPORT_MM))
    for written in (out / EXPORT_MM, *(out / EXPORT_LLM).glob("*.safetensors")):
        umask_mode(written)
    info = {"config": asdict(model.config), "imagebind": str(Path(imagebind).resolve()) if imagebind else None}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return out


def load_exported(
    folder: str | Path,
    imagebind: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    early: Sequence[EarlyRead] = (),
) -> DeepResonance:
    """A model from `export_model`'s folder; ImageBind from the recorded path unless given. `early`: as load_model's."""
    folder = Path(folder)
    info = json.loads((folder / EXPORT_INFO).read_text())
    config = ModelConfig.from_dict(info["config"])
    imagebind = imagebind or info["imagebind"]
    llm = pretrained_llm(
        folder / EXPORT_LLM, dtype, attn_implementation, early_for(early, folder / EXPORT_LLM, device, dtype)
    )
    read = early_for(early, Path(imagebind), device, dtype) if imagebind else None
    encoder = moved_while(
        llm, device, lambda: MediaEncoder.load(imagebind, device=device, dtype=dtype, early=read) if imagebind else None
    )
    mm = load_file(folder / EXPORT_MM)
    model = DeepResonance(
        config,
        llm,
        PromptTokenizer.from_dir(folder / EXPORT_LLM),
        encoder,
        mm["llama_proj.weight"].shape[1],
        lora=False,
    )
    load_delta(model, mm, str(folder / EXPORT_MM))
    # the merged LLM differs everywhere from another merge: its shards' cheap fingerprints tell them apart
    shards = [file_fingerprint(p) for p in sorted((folder / EXPORT_LLM).glob("*.safetensors"))]
    model.delta_fingerprint = (
        fingerprint([folder / EXPORT_MM]) + "-" + hashlib.sha256("".join(shards).encode()).hexdigest()[:16]
    )
    return model.to(device=device, dtype=dtype).eval()


def model_setup(
    base: Path,
    delta: Path | None,
    state: Mapping[str, torch.Tensor | tuple[int, ...]],
    config: ModelConfig,
    variant: str | None,
) -> tuple[ModelConfig, Path]:
    """(architecture, tokenizer folder) for a base + delta: dr_config.json, then what the delta's keys say; a delta
    of the other variant is an error. Shared by `load_model` and `check_delta_file`."""
    if delta is None:
        return (replace(config, variant=variant) if variant is not None else config), base
    saved = (delta / DR_CONFIG).is_file()
    if saved:
        config = read_config(delta / DR_CONFIG, config)
    config = delta_config(state, config)
    if variant is not None and variant != config.variant:
        raise DeltaError(f"{delta}: holds a {config.variant} delta, not {variant}")
    if not saved and config.lora_r != ModelConfig.lora_r:  # the original's deltas hold the rank but not alpha
        log.warning(
            "%s: LoRA rank %d with no saved alpha (the original's deltas do not keep it): loading with alpha %d "
            "(scale %.3g); give --lora-alpha if it was trained with another",
            delta,
            config.lora_r,
            config.lora_alpha,
            config.lora_alpha / config.lora_r,
        )
    return config, delta if (delta / "tokenizer.model").is_file() else base


def check_delta_file(path: Path, base: Path, encoder_dim: int | None, variant: str | None) -> list[str]:
    """What `load_model` would refuse in this delta file, found without loading the LLM: the model it would build
    is built on the meta device (shapes only) and the loader's own checks run against it. For `dr ckpt doctor`."""

    from model.io.errors import CkptError
    from model.io.weights import load_pickle, safetensors_file

    try:
        state = safetensors_file(path) if path.suffix == ".safetensors" else load_pickle(path)
        state = {_modern_key(k): v for k, v in state.items()}
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        config, tok_dir = model_setup(base, path.parent, shapes, ModelConfig(), variant)
        tokenizer = PromptTokenizer.from_dir(tok_dir)
        if encoder_dim is None and PROJ_KEY in shapes and len(shapes[PROJ_KEY]) == 2:
            encoder_dim = shapes[PROJ_KEY][1]
        with init_empty_weights():
            llm = LlamaForCausalLM(LlamaConfig.from_pretrained(base))
            model = DeepResonance(config, llm, tokenizer, None, encoder_dim or 1)
            own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except (CkptError, ValueError, OSError) as err:
        return [" ".join(str(err).split()).removeprefix(f"{path}: ")]
    problems = delta_problems(shapes, own)
    bad = non_finite(state) if not problems else []
    return problems + ([f"{len(bad)} tensor(s) hold NaN or infinite values (first: '{bad[0]}')"] if bad else [])


def _modern_key(key: str) -> str:
    for old, new in LEGACY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def load_model(
    base: str | Path,
    delta: str | Path | None,
    imagebind: str | Path | None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    config: ModelConfig | None = None,
    early: Sequence[EarlyRead] = (),
) -> DeepResonance:
    """A DeepResonance model from a Vicuna folder, a delta folder and ImageBind weights (None: features only).

    A delta folder written by `export_model` is loaded standalone (the base folder is not needed). `early`: reads
    begun before this module was imported (`EarlyRead(llm_folder(base, delta), device, dtype)` for the LLaMA,
    `EarlyRead(imagebind, device, dtype, keep=kept_weight)` for ImageBind), each taken by the load of its source
    where it read onto `device` in `dtype`; the caller closes them after."""
    if exported(delta):
        model = load_exported(delta, imagebind, device, dtype, attn_implementation, early)
        if variant is not None and variant != model.config.variant:
            raise DeltaError(f"{delta}: holds an exported {model.config.variant} model, not {variant}")
        return model
    base = Path(base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: no config.json: not a Hugging Face LLaMA folder (see `dr ckpt doctor`)")
    config = config or ModelConfig()
    state = read_delta(delta) if delta is not None else {}
    config, tok_dir = model_setup(base, Path(delta) if delta is not None else None, state, config, variant)
    tokenizer = PromptTokenizer.from_dir(tok_dir)
    llm = load_base(base, dtype, attn_implementation, device, early)
    encoder = moved_while(
        llm, device, lambda: load_encoder(Path(imagebind), device, dtype, early) if imagebind is not None else None
    )
    if encoder is not None:
        config = replace(config, encoder_size=encoder.size)
        encoder_dim = encoder.out_dim
    elif "llama_proj.weight" in state:
        encoder_dim = state["llama_proj.weight"].shape[1]
    else:
        encoder_dim = ENCODER_SIZES[config.encoder_size]["out_embed_dim"]
    model = DeepResonance(config, llm, tokenizer, encoder, encoder_dim)
    if state:
        load_delta(model, state, str(delta))
    model.delta_fingerprint = fingerprint([delta_file(delta)]) if delta is not None else None
    return model.to(device=device, dtype=dtype).eval()
