"""Where a training process runs: its place in the job (ranks, the process group DeepSpeed starts), its device and
precision, its random generators (saved with each checkpoint so a resumed run draws the same numbers) and the
DeepSpeed config completed from the recipe."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import torch

from model.config import TrainConfig
from model.io.dist import Ranks, ranks_from_env


class Dist(Ranks):
    """This process's place in the job, with the two collectives the loop needs. Not accelerate's PartialState: it
    would start (or adopt) the process group and pick the device by its own rules, where DeepSpeed's init_distributed
    owns the group and a single process has none."""

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged over the ranks (as is, in a world of one)."""
        if self.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.AVG)
        return values


def deepspeed_module():
    """deepspeed, imported with its accelerator named where there is no CUDA (its import otherwise warns)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_deepspeed_dist() -> Dist:
    """Join the job the `deepspeed` launcher or torchrun started (or a one-process job): NCCL on GPUs, gloo on CPU."""
    deepspeed = deepspeed_module()

    if "RANK" not in os.environ:  # started by hand: a world of one, told to DeepSpeed through the environment
        # by hand: accelerate's get_free_port is not in accelerate.utils' API and binds every interface, not loopback
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), ranks_from_env().local_rank)


def rng_state() -> dict:
    """This process's Python, torch and CUDA generators. By hand: accelerate captures them only inside save_state, into
    a pickled random_states_N.pkl of its own layout, where ours is a weights-only file carrying the checkpoint's id."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` took (accelerate's counterpart is likewise only inside load_state)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def select_device(
    device: str | None, dtype: torch.dtype | None, ds_config: dict | None, local_rank: int
) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and the precision of its frozen weights, made the current CUDA device if one.

    DeepSpeed keeps the module in the precision its config asks for, on its rank's GPU; one process defaults to
    CUDA in bfloat16 when there is one (trained weights are float32 either way, see Trainer._build_model).
    """
    if ds_config is not None:
        dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda" and where.index is None:  # set_device needs an index
        where = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or (torch.bfloat16 if where.type == "cuda" else torch.float32)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"train in float32 or bfloat16, not {dtype}")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    return where, dtype


def deepspeed_config(path: str | Path, cfg: TrainConfig) -> dict:
    """A DeepSpeed JSON (ZeRO and precision) completed from the recipe: batch sizes and clipping come from cfg,
    the optimizer and schedule from model/train/optim.py, so both paths train the same way."""
    ds = json.loads(Path(path).read_text())
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{path}: remove '{key}': the optimizer and lr schedule come from the training options")
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ValueError(f"{path}: '{key}' is {ds[key]}, but the training options say {value}; set it there")
    ds.pop("train_batch_size", None)
    ds.setdefault("steps_per_print", 10**9)
    return {**ds, **wanted}
