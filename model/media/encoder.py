"""The frozen ImageBind encoder, returning per-clip embeddings the way DeepResonance's modified ImageBind does."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn

from model.config import ENCODER_SIZES
from model.io.early_read import EarlyRead
from model.io.files import file_identity
from model.io.transfer import converted, placed, to_device

# dr's modality names -> ImageBind's; images and videos both go through the vision tower
IMAGEBIND_MODALITY = {"audio": "audio", "image": "vision", "video": "vision"}
# the most files of a kind one encoder call takes (a job's groups are its slot count, 512 on CUDA): the call runs
# beside the engine's cache pool. ImageBind-huge in bf16 on an H100 encodes as many files a second at 16 a call as at
# 512, while the activations grow with the call: a video's are 15 times an audio file's, and 512 videos' did not fit
# beside the pool of an 80 GB card (benchmarks/results/2026-12-06-h100-encoder-calls/: video 16 a call 1.9 GiB)
CALL_FILES = {"audio": 64, "image": 64, "video": 16}
# ImageBind's per-modality module dicts, and the towers DeepResonance uses (the text, depth, thermal and IMU ones are
# dropped after a strict load: about a quarter of the memory)
TOWER_PARTS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
KEPT_TOWERS = ("audio", "vision")


def imagebind_model_module() -> types.ModuleType:
    """`imagebind.models.imagebind_model` without running `imagebind/__init__.py`.

    The package's __init__ imports its data module, which needs pytorchvideo and decord (broken against current
    torchvision). The model classes need neither, so register the package namespace by hand and import only them.
    """
    if "imagebind" not in sys.modules:
        spec = importlib.util.find_spec("imagebind")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("ImageBind is not installed: pip install --no-deps imagebind-unofficial==0.1.1")
        package = types.ModuleType("imagebind")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["imagebind"] = package
    from imagebind.models import imagebind_model

    return imagebind_model


class PatchProjection(nn.Conv3d):
    """A Conv3d whose kernel equals its stride (ImageBind's vision stem: 2 frames x 14 x 14 pixels a patch) computed as
    what it is, one matrix product over the flattened, non-overlapping patches. cuDNN's kernels for such convolutions
    are slow on several torch/cuDNN versions (vLLM and transformers swap them for a linear layer the same way): on an
    H100 the stem of a 16-video call took 6.86 ms as cuDNN's Conv3d, 0.49 ms as this product
    (benchmarks/results/2026-12-07-h100-fused-encoder-jobs/). The weight keeps the Conv3d's name and shape, so
    ImageBind checkpoints load unchanged. On a CPU the convolution stays: oneDNN's was 7x faster there than the
    patches' permuted copy (tiny encoder, 2 cores)."""

    @classmethod
    def replacing(cls, conv: nn.Conv3d) -> PatchProjection:
        """A PatchProjection holding `conv`'s own parameters (no copy)."""
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=False, device="meta")
        out.weight, out.bias = conv.weight, conv.bias
        return out

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv3d
            and conv.kernel_size == conv.stride
            and conv.padding == (0, 0, 0)
            and conv.dilation == (1, 1, 1)
            and conv.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_product(x) if x.is_cuda else super().forward(x)

    def patch_product(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as one matrix product: [N, C, T, H, W] -> [N, out, T/kt, H/kh, W/kw]."""
        n, c = x.shape[:2]
        kt, kh, kw = self.kernel_size
        t, h, w = x.shape[2] // kt, x.shape[3] // kh, x.shape[4] // kw
        x = x[:, :, : t * kt, : h * kh, : w * kw]  # a convolution's floor: a partial patch at the end is dropped
        patches = x.reshape(n, c, t, kt, h, kh, w, kw).permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)
        return F.linear(patches, self.weight.flatten(1), self.bias).permute(0, 4, 1, 2, 3)


def use_patch_projections(module: nn.Module) -> None:
    """Swap each non-overlapping Conv3d under `module` for a PatchProjection over the same parameters."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if PatchProjection.applies_to(child):
                setattr(parent, name, PatchProjection.replacing(child))


class BatchFirstAttention(nn.MultiheadAttention):
    """ImageBind's self-attention (nn.MultiheadAttention over [positions, batch, width], no mask) computed over
    [batch, positions, width]: q, k and v are strided views of one projection, handed to scaled_dot_product_attention
    as they are, and its output is already in the layout the out projection reads. The stock module rearranges its
    projections and its output: on an H100, 97 copies took 34 ms of a 207 ms video call
    (benchmarks/results/2026-12-07-h100-fused-encoder-jobs/); on a CPU this trunk makes 3 copies fewer in a one-block
    trunk (torch.profiler, tiny encoder). Not yet timed on a GPU (benchmarks/README.md, Pending). Same parameters, so
    checkpoints load unchanged."""

    @classmethod
    def replacing(cls, attn: nn.MultiheadAttention) -> BatchFirstAttention:
        """A BatchFirstAttention holding `attn`'s own parameters (no copy)."""
        if not attn._qkv_same_embed_dim or attn.add_zero_attn or attn.dropout or attn.batch_first:
            raise ValueError(f"not ImageBind's self-attention: {attn}")
        add_bias_kv = attn.bias_k is not None
        out = cls(attn.embed_dim, attn.num_heads, add_bias_kv=add_bias_kv, device="meta")
        out.in_proj_weight, out.in_proj_bias, out.out_proj = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj
        out.bias_k, out.bias_v = attn.bias_k, attn.bias_v
        return out

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if attn_mask is not None:
            raise ValueError("BatchFirstAttention takes no attention mask (the audio and vision trunks have none)")
        batch, positions, width = x.shape
        heads, size = self.num_heads, width // self.num_heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, positions, 3, heads, size).unbind(2)
        if self.bias_k is not None:  # one learned key and value position after the others (the audio tower's)
            k = torch.cat([k, self.bias_k.view(1, 1, heads, size).expand(batch, 1, heads, size)], 1)
            v = torch.cat([v, self.bias_v.view(1, 1, heads, size).expand(batch, 1, heads, size)], 1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out_proj(out.transpose(1, 2).reshape(batch, positions, width))


def use_batch_first_trunks(imagebind: nn.Module, modalities: tuple[str, ...] = ("audio", "vision")) -> None:
    """Run the trunks of `modalities` over [batch, positions, width] throughout: their layouts' rearrangements
    dropped, each block's attention a BatchFirstAttention over the same parameters (the blocks' layer norms and
    MLPs work on any layout)."""
    rearrange = imagebind_model_module().EinOpsRearrange
    for key in modalities:
        trunk = imagebind.modality_trunks[key]
        pre, post = trunk.pre_transformer_layer, trunk.post_transformer_layer
        if not (isinstance(pre, nn.Sequential) and isinstance(pre[-1], rearrange) and isinstance(post, rearrange)):
            raise ValueError(f"the {key} trunk is not ImageBind's seq-first SimpleTransformer")
        pre[-1], trunk.post_transformer_layer = nn.Identity(), nn.Identity()
        for block in trunk.blocks:
            block.attn = BatchFirstAttention.replacing(block.attn)


class NonFiniteFeatures(ValueError):
    """The encoder computed NaN or Inf for some items of a batch (`items`, 0-based); `features` holds the whole
    batch's output, so a caller can keep the items that are finite. Such features must never reach a prompt or a
    cache: a masked attention weight of 0 times NaN is NaN, which would poison the rows decoded after them."""

    def __init__(self, modality: str, items: list[int], features: torch.Tensor) -> None:
        self.items, self.features = items, features
        which = ", ".join(str(i + 1) for i in items)
        super().__init__(f"{modality} item(s) {which} of the batch: encoder features are not finite (NaN or Inf)")


class MediaEncoder(nn.Module):
    """Frozen ImageBind: ImageBind inputs [B, ...] -> unit-norm clip embeddings [B, clips, D].

    Each clip goes preprocessor -> trunk -> head -> L2 normalise. The original applies only the Normalize of the
    audio postprocessor (no logit scale of 20), so audio embeddings have unit norm like vision ones. `forward` raises
    NonFiniteFeatures on non-finite outputs; `embed` leaves that check to its caller.
    """

    def __init__(self, size: str = "huge") -> None:
        super().__init__()
        self.size = size
        self.imagebind = imagebind_model_module().ImageBindModel(**ENCODER_SIZES[size])
        use_patch_projections(self.imagebind)
        use_batch_first_trunks(self.imagebind)
        self.out_dim = ENCODER_SIZES[size]["out_embed_dim"]
        self.fingerprint = f"imagebind-{size}-random-{id(self):x}"
        self._source: dict[str, str | int] | None = None  # see weights_file
        self._source_versions: tuple[int, ...] = ()
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(
        cls,
        path: str | Path,
        size: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        early: EarlyRead | None = None,
    ) -> MediaEncoder:
        """Build and load an ImageBind state dict (`imagebind_huge.pth`; its size is read from the weights unless
        given), its floating tensors in `dtype` (None: the file's) on `device`. The text/depth/thermal/IMU towers
        DeepResonance never uses are dropped after a strict load, saving about a quarter of the memory. The model is
        built with its parameters on the meta device and takes the file's tensors as they are (or those `early` read
        onto the device while the process imported): ImageBind-huge's random initialisation, overwritten at once,
        took 11.2 s of a 12.4 s load on a CPU (benchmarks/results/2026-12-07-cpu-model-load/)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ImageBind weights not found (run `dr ckpt download imagebind`)")
        state = early.take() if early is not None else None
        # by address: the module's parameters wrap the read's tensors (the same memory), not the same objects
        copied = {t.data_ptr() for name, t in (state or {}).items() if early.keep is None or early.keep(name)}
        before = early.identity if state is not None else file_identity(path)
        try:
            state = state or torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # a truncated or non-tensor file: say which file, not a pickle trace
            raise ValueError(f"{path}: not a readable ImageBind checkpoint ({type(err).__name__}: {err})") from err
        size = size or size_of(state, path)
        with init_empty_weights():
            encoder = cls(size)
        result = encoder.imagebind.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            bad = (result.missing_keys or result.unexpected_keys)[0]
            kind = "missing" if result.missing_keys else "unexpected"
            raise ValueError(f"{path}: {kind} key '{bad}' for ImageBind-{size}")
        encoder.fingerprint = f"imagebind-{size}-{file_fingerprint(path)}"
        encoder.drop_unused_towers()
        # copied out of the file's mapping, as a load into built parameters did (a mapped file rewritten in place
        # would fault the encoder's later reads), straight to where the model runs: on a GPU a copy on the host, then
        # another to the card, went twice over ImageBind-huge's 3.6 GB. Tensors `early` copied (by the same op) stay.
        converted(encoder, lambda t: t if t.data_ptr() in copied else placed(t, device, dtype))
        if file_identity(path) == before:  # the file was not replaced or rewritten while it was read
            encoder._source, encoder._source_versions = before, encoder._versions()
        return encoder

    def weights_file(self) -> dict[str, str | int] | None:
        """The identity of the file this encoder's weights were loaded from (path, size, mtime, ctime, inode,
        device), so a digest of the weights can be remembered by it; None when the weights were not loaded from a
        file, or when a tensor has been written in place since (every in-place write bumps its version counter,
        e.g. a delta that carries `visual_encoder.` keys), as then the file no longer names them."""
        if self._source is None or self._versions() != self._source_versions:
            return None
        return dict(self._source)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.state_dict().values())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MediaEncoder:
        """`.to`/`.cuda`/`.half` replace some tensors (resetting their version counters) without changing what the
        file names: the weights' dtype is part of the digest memo's key. So an encoder unchanged since loading stays
        unchanged through a conversion."""
        unchanged = self.weights_file() is not None
        out = super()._apply(fn, recurse)
        if unchanged:
            self._source_versions = self._versions()
        return out

    def drop_unused_towers(self) -> None:
        for part in TOWER_PARTS:
            towers = getattr(self.imagebind, part)
            for name in list(towers.keys()):
                if name not in KEPT_TOWERS:
                    del towers[name]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def train(self, mode: bool = True) -> MediaEncoder:
        """Stays in eval mode: ImageBind is frozen (no drop-path) in every stage."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        features = self.embed(modality, inputs)
        finite = torch.isfinite(features).flatten(1).all(1).tolist()
        if not all(finite):
            raise NonFiniteFeatures(modality, [i for i, ok in enumerate(finite) if not ok], features)
        return features

    @torch.no_grad()
    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """`forward` without its finiteness check, which reads the features back: the call only queues the GPU
        work, so a caller can queue the next call before it reads this one's features
        (model/media/encoding.py's `encode_misses` checks them on the host)."""
        key = IMAGEBIND_MODALITY[modality]
        batch = inputs.shape[0]
        x = to_device(inputs, self.device).to(self.dtype)
        if x.ndim >= 5 and modality != "image":  # several clips per item: fold them into the batch
            x = x.reshape(batch * x.shape[1], *x.shape[2:])
        ib = self.imagebind
        tokens = ib.modality_preprocessors[key](**{key: x})
        features = ib.modality_trunks[key](**tokens["trunk"])
        features = ib.modality_heads[key](features, **tokens["head"])
        post = ib.modality_postprocessors[key]
        features = post[0](features) if isinstance(post, nn.Sequential) else post(features)
        return features.reshape(batch, -1, features.shape[-1])


def size_of(state: dict[str, torch.Tensor], path: Path) -> str:
    """Which ImageBind size a state dict holds, from its vision and output widths."""
    try:
        vision = state["modality_trunks.vision.blocks.0.attn.in_proj_weight"].shape[1]
        out = state["modality_heads.vision.2.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{path}: not an ImageBind state dict (no {err})") from err
    for name, size in ENCODER_SIZES.items():
        if size["vision_embed_dim"] == vision and size["out_embed_dim"] == out:
            return name
    raise ValueError(f"{path}: no known ImageBind size has vision width {vision} and output {out}")


def kept_weight(name: str) -> bool:
    """Whether an ImageBind state key survives `drop_unused_towers`: what a read begun early copies to the card."""
    part, _, rest = name.partition(".")
    return part not in TOWER_PARTS or rest.partition(".")[0] in KEPT_TOWERS


def file_fingerprint(path: Path) -> str:
    """Cheap identity of a big weights file (size + first and last MiB) for cache keys."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]
