"""Delta checkpoints in the original's format, and building a ready model from base + delta folders.

A delta (`pytorch_model.pt`) is a flat dict of the parameters that trained: LoRA A/B, the resized embed_tokens and
lm_head, `llama_proj.*`, and for beta `preencoding.*`. Loading is strict: every key must exist in the model with the
same shape, and the LoRA rank and fusion depth are read from the delta, never assumed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from model.config import ENCODER_SIZES, ModelConfig
from model.deepresonance import DeepResonance
from model.encoder import MediaEncoder, file_fingerprint
from model.tokenizer import PromptTokenizer

DELTA_PT = "pytorch_model.pt"
DELTA_ST = "delta.safetensors"
DR_CONFIG = "dr_config.json"
LORA_KEY = re.compile(r"\.layers\.\d+\..*\.lora_[AB]\.")
FUSION_LAYER = re.compile(r"^preencoding\.layers\.(\d+)\.")
# stage-1 deltas of the original have no LoRA wrapper in their names
LEGACY_PREFIXES = {
    "llama_model.model.": "llama_model.base_model.model.model.",
    "llama_model.lm_head.": "llama_model.base_model.model.lm_head.",
}


class DeltaError(ValueError):
    pass


def read_delta(folder: str | Path) -> dict[str, torch.Tensor]:
    """The delta tensors of a folder; safetensors when present, else the pickle loaded with weights_only."""
    folder = Path(folder)
    st, pt = folder / DELTA_ST, folder / DELTA_PT
    try:
        if st.is_file():
            state = load_file(st)
        elif pt.is_file():
            state = dict(torch.load(pt, map_location="cpu", weights_only=True))
        else:
            raise DeltaError(f"{folder}: no {DELTA_PT} or {DELTA_ST} (run `dr ckpt download`)")
    except DeltaError:
        raise
    except Exception as err:
        raise DeltaError(f"{st if st.is_file() else pt}: unreadable delta ({type(err).__name__}: {err})") from err
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value.detach() if isinstance(value, torch.Tensor) else value
    return out


def delta_file(folder: str | Path) -> Path:
    """The file `read_delta` reads: safetensors when present, else the pickle."""
    folder = Path(folder)
    return folder / DELTA_ST if (folder / DELTA_ST).is_file() else folder / DELTA_PT


def fingerprint(files: list[Path]) -> str:
    """sha256 over the files' contents, taken from the download manifest when it recorded this very size."""
    from ckpt.files import read_manifest, sha256_file

    digest = hashlib.sha256()
    for path in files:
        recorded = read_manifest(path.parent).get(path.name, {})
        same = recorded.get("size") == path.stat().st_size and recorded.get("sha256")
        digest.update((same or sha256_file(path)).encode())
    return digest.hexdigest()[:16]


def delta_config(state: dict[str, torch.Tensor], base: ModelConfig) -> ModelConfig:
    """Variant, LoRA rank and fusion depth as the delta holds them."""
    fusion_layers = {int(m.group(1)) for k in state if (m := FUSION_LAYER.match(k))}
    lora_a = [v for k, v in state.items() if ".lora_A." in k]
    variant = "beta" if fusion_layers else "alpha"
    return replace(
        base,
        variant=variant,
        fusion_layers=max(fusion_layers) + 1 if fusion_layers else base.fusion_layers,
        lora_r=lora_a[0].shape[0] if lora_a else base.lora_r,
    )


def load_delta(model: DeepResonance, state: dict[str, torch.Tensor], source: str = "delta") -> None:
    """Copies a delta into the model; a missing, unexpected or misshapen key is an error naming it."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise DeltaError(f"{source}: unexpected key '{key}'")
        if tuple(own[key].shape) != tuple(value.shape):
            raise DeltaError(f"{source}: '{key}' has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
    required = [k for k in own if k.startswith(("llama_proj.", "preencoding."))]
    if any(LORA_KEY.search(k) for k in state):
        required += [k for k in own if LORA_KEY.search(k)]
    for key in required:
        if key not in state:
            raise DeltaError(f"{source}: missing key '{key}'")
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


def save_delta(model: DeepResonance, folder: str | Path) -> Path:
    """Writes `pytorch_model.pt` (loadable by the original), `delta.safetensors`, tokenizer, LLaMA config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = delta_state(model)
    tmp = folder / (DELTA_PT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / DELTA_PT)
    save_file(dict(state), str(folder / (DELTA_ST + ".tmp")))
    (folder / (DELTA_ST + ".tmp")).replace(folder / DELTA_ST)
    model.tokenizer.save(folder)
    model.llama_model.config.save_pretrained(folder)
    (folder / DR_CONFIG).write_text(json.dumps(asdict(model.config), indent=2))
    return folder


EXPORT_INFO = "dr_export.json"
EXPORT_LLM = "llm"
EXPORT_MM = "mm.safetensors"


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
    info = {"config": asdict(model.config), "imagebind": str(Path(imagebind).resolve()) if imagebind else None}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return out


def load_exported(
    folder: str | Path,
    imagebind: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> DeepResonance:
    """A model from `export_model`'s folder; ImageBind from the recorded path unless given."""
    folder = Path(folder)
    info = json.loads((folder / EXPORT_INFO).read_text())
    config = ModelConfig.from_dict(info["config"])
    imagebind = imagebind or info["imagebind"]
    encoder = MediaEncoder.load(imagebind) if imagebind else None
    llm = LlamaForCausalLM.from_pretrained(folder / EXPORT_LLM, dtype=dtype, attn_implementation=attn_implementation)
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


def load_model(
    base: str | Path,
    delta: str | Path | None,
    imagebind: str | Path | None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    config: ModelConfig | None = None,
) -> DeepResonance:
    """A DeepResonance model from a Vicuna folder, a delta folder and ImageBind weights (None: features only).

    A delta folder written by `export_model` is loaded standalone (the base folder is not needed).
    """
    if delta is not None and (Path(delta) / EXPORT_INFO).is_file():
        model = load_exported(delta, imagebind, device, dtype, attn_implementation)
        if variant is not None and variant != model.config.variant:
            raise DeltaError(f"{delta}: holds an exported {model.config.variant} model, not {variant}")
        return model
    base = Path(base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: no config.json: not a Hugging Face LLaMA folder (see `dr ckpt doctor`)")
    config = config or ModelConfig()
    state = {}
    tok_dir = base
    if delta is not None:
        delta = Path(delta)
        state = read_delta(delta)
        saved = delta / DR_CONFIG
        if saved.is_file():
            config = ModelConfig.from_dict(json.loads(saved.read_text()), base=config)
        config = delta_config(state, config)
        if variant is not None and variant != config.variant:
            raise DeltaError(f"{delta}: holds a {config.variant} delta, not {variant}")
        if (delta / "tokenizer.model").is_file():
            tok_dir = delta
    elif variant is not None:
        config = replace(config, variant=variant)
    tokenizer = PromptTokenizer.from_dir(tok_dir)
    llm = LlamaForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation)
    encoder = MediaEncoder.load(imagebind) if imagebind is not None else None
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
