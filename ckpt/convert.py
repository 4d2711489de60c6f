"""`dr ckpt convert`: the legacy pickled delta (`pytorch_model.pt`) as `delta.safetensors`, same keys and values.

safetensors loads without any pickle and memory-maps; `dr` prefers it when both files are present.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from model.io.errors import CkptError
from model.io.files import written_atomically
from model.io.manifest import record_manifest, sha256_file
from model.io.weights import load_pickle, safetensors_shapes


def convert_delta(delta_dir: Path) -> Path:
    """Write `delta_dir/delta.safetensors` from `delta_dir/pytorch_model.pt` and check it holds the same tensors."""
    from model.network.checkpoint import (  # here: model.network.checkpoint imports transformers (~4 s)
        DELTA_PT,
        DELTA_ST,
    )

    src, dst = delta_dir / DELTA_PT, delta_dir / DELTA_ST
    if not src.is_file():
        raise CkptError(f"no {DELTA_PT} in {delta_dir}")
    state = load_pickle(src)
    with written_atomically(dst) as tmp:  # a failed check removes the temporary file, leaving no dst
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        if safetensors_shapes(tmp) != {k: tuple(v.shape) for k, v in state.items()}:
            raise CkptError(f"{tmp} does not hold the tensors of {src}")
    record_manifest(delta_dir, {dst.name: {"size": dst.stat().st_size, "sha256": sha256_file(dst)}})
    return dst
