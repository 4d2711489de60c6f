"""The two-stage training loop: one process (CPU or one GPU, plain PyTorch) or many through DeepSpeed (ZeRO-2).

Both paths share everything but the optimizer step: the data (rows -> cached encoder features, so the frozen ImageBind
runs once per file, then is dropped), the batch order (model/train/batch_sampler.py), the optimizer (AdamW, which is what the
original's DeepSpeed "Adam" is: adam_w_mode defaults to on) and the schedule (DeepSpeed's WarmupDecayLR, rebuilt as a
LambdaLR). A checkpoint is the delta (save_delta: the original's pytorch_model.pt + safetensors) plus the optimizer,
scheduler, step and RNG state, so a resumed run continues the very same trajectory.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from model.config import CLIPS_PER_ITEM, ModelConfig, TrainConfig
from model.data.catalog import DatasetError, DatasetSpec, Row, load_rows, media_path, resolve_dataset
from model.io.stop_signal import StopOnSignal
from model.media.features import FeatureCache, encode_files
from model.network.checkpoint import DELTA_PT, DELTA_ST, DR_CONFIG, load_delta, load_model, read_delta, save_delta
from model.network.deepresonance import DeepResonance, Example
from model.text.prompt import layout_row
from model.train.batch_sampler import MixedBatchSampler
from model.train.log import TrainLog

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
RNG_FILE = "rng-{rank}.pt"
MARKER = "checkpoint.json"  # written last: {run_id, step, files}; a folder without it is not a checkpoint
DS_DIR, DS_TAG = "deepspeed", "state"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
AUTO_SAVES = 10  # with no --save-every: a checkpoint every tenth of the run (only the newest is kept)
# what a run writes into --out: a fresh run refuses an --out holding any of these unless told --overwrite
RUN_FILES = (STATE_FILE, MARKER, DELTA_PT, DELTA_ST, DR_CONFIG, "train_config.json", DS_DIR, "logs")
# options that shape the trajectory: a resumed run must use the values it was started with
RESUME_FIXED = (
    "stage",
    "datasets",
    "epochs",
    "lr",
    "warmup_rate",
    "warmup_type",
    "warmup_min_steps",
    "betas",
    "eps",
    "weight_decay",
    "grad_clip",
    "micro_batch_size",
    "grad_accum",
    "max_length",
    "seed",
    "max_steps",
    "group_size",
    "train_embeddings",
)


# ---------------------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, total: int, warmup: int, kind: str = "log") -> float:
    """DeepSpeed's WarmupDecayLR as a multiple of the peak lr at optimizer step `step` (0-based).

    Warm-up from 0 to 1 over `warmup` steps (log: log(step + 1) / log(warmup), DeepSpeed's default, which the
    original used; or linear), then linear decay to 0 at `total`.
    """
    warmup = max(2, warmup)  # as WarmupLR
    if step < warmup:
        return math.log(step + 1) / math.log(warmup) if kind == "log" else step / warmup
    return max(0.0, (total - step) / max(1.0, total - warmup))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """The original: max(10, int(total * warmup_rate)); the 10 is `warmup_min_steps`."""
    return max(cfg.warmup_min_steps, int(total * cfg.warmup_rate))


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of the run: --max-steps, else those of `epochs` epochs (at least one)."""
    return cfg.max_steps or max(1, cfg.epochs * micro_batches_per_epoch // cfg.grad_accum)


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, total: int, warmup: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (the original's DeepSpeed "Adam") + WarmupDecayLR, the same objects on both paths."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.warmup_type))
    return optimizer, scheduler


# -------------------------------------------------------------------------------------------------------- parameters
def embedding_params(model: DeepResonance) -> list[nn.Parameter]:
    return [model.embed_tokens.weight, model.llama_model.get_output_embeddings().weight]


def set_trainable(model: DeepResonance, stage: int, train_embeddings: bool) -> list[str]:
    """Stage 1: projector (+ fusion); stage 2: also LoRA. Embeddings when asked (the original trained the resized
    embed_tokens / lm_head: its resize after freezing / LoRA wrapping left them trainable). Returns the names."""
    embeddings = {id(p) for p in embedding_params(model)} if train_embeddings else set()
    names = []
    for name, param in model.named_parameters():
        train = (
            name.startswith(("llama_proj.", "preencoding."))
            or (stage == 2 and ".lora_" in name)
            or id(param) in embeddings
        )
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


# -------------------------------------------------------------------------------------------------------------- data
@dataclass
class TrainSet:
    """Rows of every dataset, concatenated, with each media item's cached features (one file per media file)."""

    names: list[str]
    rows: list[Row]
    media: list[list[tuple[str, Path]]]  # per row: (modality, feature-cache entry)
    lengths: list[list[int]]  # per dataset: token length of each row (capped at max_length)
    skipped: list[str] = field(default_factory=list)  # one line per dropped row

    def examples(self, indices: Sequence[int]) -> list[Example]:
        out = []
        for i in indices:
            row = self.rows[i]
            media = [(m, load_file(entry)["features"]) for m, entry in self.media[i]]
            out.append(Example(row.input, row.instruction, media, row.output))
        return out


def _encode_all(
    model: DeepResonance, cache: FeatureCache, files: list[tuple[str, Path]], batch_size: int, rank: int, world: int
) -> dict[tuple[str, Path], Path | str]:
    """(modality, file) -> its cache entry, or the reason it cannot be used. Ranks encode a shard each."""
    mine = files[rank::world]
    out: dict[tuple[str, Path], Path | str] = {}
    for modality in sorted({m for m, _ in mine}):
        paths = [p for m, p in mine if m == modality]
        for start in range(0, len(paths), 1024):  # bounded memory: features go to disk, only entries are kept
            chunk = paths[start : start + 1024]
            for path, result in zip(
                chunk, encode_files(model.visual_encoder, cache, modality, chunk, batch_size), strict=True
            ):
                out[(modality, path)] = str(result) if isinstance(result, Exception) else cache.entry(modality, path)
    if world > 1:
        gathered: list[dict | None] = [None] * world
        torch.distributed.all_gather_object(gathered, out)
        out = {k: v for part in gathered for k, v in part.items()}
    return out


def load_train_set(
    model: DeepResonance,
    specs: Sequence[DatasetSpec],
    cache: FeatureCache,
    max_length: int,
    encode_batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
) -> TrainSet:
    """Datasets (`resolve_dataset(..., split="train")`) -> a TrainSet; invalid rows and unreadable media are skipped
    (and listed)."""
    per_dataset, skipped = [], []
    for spec in specs:
        rows, errors = load_rows(spec.json_path)
        skipped += errors
        per_dataset.append(
            [(row, [(m, media_path(row, i, spec.media_root)) for i, m in enumerate(row.mm_names)]) for row in rows]
        )
    files = sorted({f for rows in per_dataset for _, media in rows for f in media})
    entries = _encode_all(model, cache, files, encode_batch_size, rank, world)
    clips = dict(CLIPS_PER_ITEM) if model.config.embs_seq else dict.fromkeys(CLIPS_PER_ITEM, 1)
    out = TrainSet([s.name for s in specs], [], [], [])
    for spec, rows in zip(specs, per_dataset, strict=True):
        lengths = []
        for row, media in rows:
            bad = [entries[f] for f in media if isinstance(entries[f], str)]
            if bad:
                skipped.append(f"{spec.json_path}: row {row.id}: {bad[0]}")
                continue
            ids = layout_row(model.tokenizer, row.input, row.instruction, [clips[m] for m, _ in media], row.output).ids
            out.rows.append(row)
            out.media.append([(m, entries[(m, p)]) for m, p in media])
            lengths.append(min(len(ids), max_length))
        if not lengths:
            raise DatasetError(f"{spec.json_path}: no usable rows")
        out.lengths.append(lengths)
    out.skipped = skipped
    return out


# ------------------------------------------------------------------------------------------------------- environment
@dataclass
class Dist:
    """This process's place in the job. Not accelerate's PartialState: it would start (or adopt) the process group and
    pick the device by its own rules, where DeepSpeed's init_distributed owns the group and a single process has none.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
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

    if "RANK" not in os.environ:  # started by hand: a world of one
        # by hand: accelerate's get_free_port is not in accelerate.utils' API and binds every interface, not loopback
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


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
    the optimizer and schedule from this module, so both paths train the same way."""
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


# ------------------------------------------------------------------------------------------------------- checkpoints
# By hand, not accelerate's save_state/load_state: those write their own layout (model.safetensors, optimizer.bin,
# random_states_N.pkl), not the original's pytorch_model.pt delta, and nothing marks a save whole or absent; the
# DeepSpeed engine's own save_checkpoint/load_checkpoint hold its partitioned optimizer.
class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed or written; one line naming the folder or file."""


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's --out folder: its final state if it finished, else its latest whole
    checkpoint-N (one a save left half-written has no marker and is passed over)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    steps = {
        int(m.group(1)): p
        for p in path.glob("checkpoint-*")
        if (m := CHECKPOINT.match(p.name)) and (p / MARKER).is_file()
    }
    if steps:
        return steps[max(steps)]
    if (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path}: no {MARKER}: a save was cut short (or an older dr wrote it); nothing to resume")
    raise CheckpointError(f"{path}: no checkpoint here or in a checkpoint-N folder: nothing to resume")


def load_state(path: Path) -> dict:
    """A trainer_state / rng file: weights-only, and a truncated or empty one is one line naming it."""
    from model.io.errors import CkptError
    from model.io.weights import torch_load

    try:
        state = torch_load(path)
    except CkptError as err:
        raise CheckpointError(f"{err}; resume from an earlier checkpoint-N") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a trainer state")
    return state


def verify_checkpoint(folder: Path, rank: int = 0) -> tuple[dict, dict]:
    """(trainer state, marker) of a checkpoint whose files all come from one save: the marker's run id and step are
    those of the trainer state, this rank's RNG state and the delta's header, and every file has its recorded size."""
    from safetensors import safe_open

    try:
        marker = json.loads((folder / MARKER).read_text())
        run_id, step, files = marker["run_id"], marker["step"], marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / MARKER}: unreadable checkpoint marker ({err})") from err
    for name, size in files.items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            raise CheckpointError(f"{folder / name}: missing or not the size its checkpoint recorded; not resumable")
    state = load_state(folder / STATE_FILE)
    rng = load_state(folder / RNG_FILE.format(rank=rank))
    with safe_open(str(folder / DELTA_ST), framework="pt") as f:
        header = f.metadata() or {}
    found = {
        folder / STATE_FILE: (state.get("run_id"), state.get("step")),
        folder / RNG_FILE.format(rank=rank): (rng.get("run_id"), rng.get("step")),
        folder / DELTA_ST: (header.get("run_id"), int(header.get("step", -1))),
    }
    for path, identity in found.items():
        if identity != (run_id, step):
            raise CheckpointError(
                f"{path}: from run {identity[0]} step {identity[1]}, but {folder} is run {run_id} step {step}: "
                "files of two saves are mixed; resume from another checkpoint-N"
            )
    return state, marker


def clear_outputs(out: Path) -> None:
    """--overwrite: what an earlier run wrote into `out` goes (nothing else in the folder is touched)."""
    for path in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*"), *(out / name for name in RUN_FILES)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in out.glob(RNG_FILE.format(rank="*")):
        path.unlink()


def check_fresh_out(out: Path, overwrite: bool) -> None:
    """A fresh run never mixes its files with an earlier run's: an --out holding one is refused unless `overwrite`."""
    found = [p.name for p in (*(out / n for n in RUN_FILES), *out.glob("checkpoint-*")) if p.exists()]
    if found and not overwrite:
        raise CheckpointError(
            f"{out}: holds an earlier run ({', '.join(sorted(found)[:3])}); pass --resume {out} to continue it, "
            "--overwrite to replace it, or another --out"
        )
    if found:
        clear_outputs(out)


@dataclass
class TrainResult:
    out: Path
    step: int
    total_steps: int
    history: list[dict] = field(default_factory=list)  # {step, loss, accuracy, lr, samples_per_s} per step
    skipped: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, after it checkpointed


# -------------------------------------------------------------------------------------------------------------- loop
class Trainer:
    """Owns the model, data, optimizer and schedule of one run; `fit` runs it to the end (or `stop_after`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        variant: str,
        base: str | Path,
        imagebind: str | Path,
        out: str | Path,
        init: str | Path | None = None,
        data_root: str | Path = "data",
        cache_dir: str | Path | None = None,
        deepspeed: str | Path | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        resume: str | Path | None = None,
        overwrite: bool = False,
        model_config: ModelConfig | None = None,
    ) -> None:
        """`model_config`: the architecture to build (LoRA rank/alpha/dropout, fusion depth; the original's YAML
        keys through `dr train --config`); a starting delta's own record and shapes win where they say something."""
        self.cfg, self.out, self.variant = cfg, Path(out), variant
        self.model_config = model_config
        self.dist = init_deepspeed_dist() if deepspeed else Dist()
        self.ds_config = deepspeed_config(deepspeed, cfg) if deepspeed else None
        self.device, dtype = select_device(device, dtype, self.ds_config, self.dist.local_rank)
        specs = [resolve_dataset(d, data_root, split="train") for d in cfg.datasets]  # bad names fail before loading
        checkpoint, saved = self._checkpoint_to_resume(resume, overwrite)
        self.run_id = saved["run_id"] if saved is not None else self._new_run_id()
        init = self._starting_delta(checkpoint, saved, init)
        self.init = str(Path(init).resolve()) if init is not None else None
        self.model = self._build_model(base, init, imagebind, dtype)
        self.data = self._encode_train_set(specs, cache_dir or Path(data_root) / ".features")
        self.model.train()
        self.sampler = self._build_sampler()
        self.total = total_steps(cfg, len(self.sampler))
        self.warmup = warmup_steps(cfg, self.total)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, self.optimizer, self.scheduler = self._build_optimizer()
        self.step = 0
        if checkpoint is not None:
            self._resume(checkpoint, saved)
        self._log_plan()

    def _checkpoint_to_resume(self, resume: str | Path | None, overwrite: bool) -> tuple[Path | None, dict | None]:
        """(checkpoint folder, its trainer state) for --resume, verified to be one whole save; a fresh run instead
        makes sure --out holds no earlier run (clearing it when `overwrite`)."""
        if resume is None:
            if self.dist.main:
                check_fresh_out(self.out, overwrite)
            return None, None
        checkpoint = find_checkpoint(resume)
        return checkpoint, verify_checkpoint(checkpoint, self.dist.rank)[0]

    def _starting_delta(
        self, checkpoint: Path | None, saved: dict | None, init: str | Path | None
    ) -> str | Path | None:
        """The delta the model starts from: a resumed run's own (once its options are checked), else --init."""
        if saved is not None:
            self._check_resumable(checkpoint, saved, init)
            return saved["init"]
        if self.cfg.stage == 2 and init is None:
            log.warning("stage 2 without --init: the projector starts random (the original starts from stage 1)")
        return init

    def _new_run_id(self) -> str:
        """One id for every file of every checkpoint of this run (all ranks agree on it)."""
        ids = [uuid.uuid4().hex]
        if self.dist.world > 1:
            torch.distributed.broadcast_object_list(ids, src=0)
        return ids[0]

    def _build_model(
        self, base: str | Path, init: str | Path | None, imagebind: str | Path, dtype: torch.dtype
    ) -> DeepResonance:
        """The model with only this stage's tensors trainable (`trainable` names them), seeded so the fresh projector
        (and LoRA A) are the same in every run and rank."""
        set_seed(self.cfg.seed)
        model = load_model(
            base, init, imagebind, variant=self.variant, device=self.device, dtype=dtype, config=self.model_config
        )
        model.config = replace(model.config, max_length=self.cfg.max_length)
        self.trainable = set_trainable(model, self.cfg.stage, self.cfg.train_embeddings)
        # one process: frozen weights in `dtype`, trained ones in float32 under autocast (fp32 master weights)
        self.autocast = self.ds_config is None and dtype != torch.float32
        if self.autocast:
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        return model

    def _encode_train_set(self, specs: list[DatasetSpec], cache_dir: str | Path) -> TrainSet:
        """The rows with their media encoded once into the feature cache (a shard per rank); the frozen encoder is
        then dropped, as every step reads cached features."""
        cache = FeatureCache.for_encoder(cache_dir, self.model.visual_encoder)
        cfg, dist = self.cfg, self.dist
        data = load_train_set(self.model, specs, cache, cfg.max_length, cfg.encode_batch_size, dist.rank, dist.world)
        if data.skipped:
            log.warning("skipped %d row(s), e.g.\n  %s", len(data.skipped), "\n  ".join(data.skipped[:5]))
        self.model.visual_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return data

    def _build_sampler(self) -> MixedBatchSampler:
        """The batch order: global batches of micro_batch_size rows per rank, each rank taking its share."""
        cfg, dist = self.cfg, self.dist
        return MixedBatchSampler(
            self.data.lengths, cfg.micro_batch_size * dist.world, cfg.seed, dist.rank, dist.world, cfg.group_size
        )

    def _build_optimizer(self):
        """AdamW + the WarmupDecayLR schedule; under DeepSpeed, wrapped by its engine (ZeRO partitions the state)."""
        optimizer, scheduler = build_optimizer(self.params, self.cfg, self.total, self.warmup)
        if self.ds_config is None:
            return None, optimizer, scheduler
        deepspeed = deepspeed_module()

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            model_parameters=self.params,
        )
        return engine, optimizer, scheduler

    def _log_plan(self) -> None:
        log.info(
            "stage %d (%s): %s; training %d tensors, %.1fM parameters, for %d steps on %d x %s",
            self.cfg.stage,
            self.variant,
            ", ".join(f"{n} {len(d)} rows" for n, d in zip(self.data.names, self.data.lengths, strict=True)),
            len(self.trainable),
            sum(p.numel() for p in self.params) / 1e6,
            self.total,
            self.dist.world,
            self.device.type,
        )

    # ----------------------------------------------------------------------------------------------------- state
    def save(self, folder: Path) -> Path:
        """Delta + optimizer/scheduler/step (+ DeepSpeed's partitioned optimizer) + every rank's RNG state, whole or
        not at all: written into a temporary folder, marked (MARKER, last) and renamed into place. The final state
        goes into --out itself: its files are moved in one by one after the old marker is removed, the marker last.

        A failed write (a full disk) removes the temporary folder and is one line; earlier checkpoints stay whole.
        """
        tmp = folder.with_name(f".{folder.name}.tmp") if folder != self.out else self.out / ".final.tmp"
        identity = {"run_id": self.run_id, "step": self.step}
        try:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.dist.barrier()
            self._write_state(tmp, identity)
            self.dist.barrier()
            if self.dist.main:
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                _write_json(tmp / MARKER, {**identity, "files": files})
                _commit(tmp, folder, into_out=folder == self.out)
        except (OSError, RuntimeError, SafetensorError) as err:
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"{folder}: could not write the step-{self.step} checkpoint ({_write_failure(err)}); "
                f"earlier checkpoints are whole: free some space and --resume {self.out}"
            ) from err
        self.dist.barrier()
        return folder

    def _write_state(self, folder: Path, identity: dict) -> None:
        state = {
            **identity,
            "total_steps": self.total,
            "world_size": self.dist.world,
            "config": asdict(self.cfg),
            "variant": self.variant,
            "init": self.init,
        }
        if self.engine is not None:
            self.engine.save_checkpoint(
                str(folder / DS_DIR), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        torch.save({**identity, "state": rng_state()}, folder / RNG_FILE.format(rank=self.dist.rank))
        if self.dist.main:
            save_delta(self.model, folder, metadata={"run_id": self.run_id, "step": str(self.step)})
            torch.save(state, folder / STATE_FILE)

    def _check_resumable(self, folder: Path, state: dict, init: str | Path | None) -> None:
        """A resumed run must replay the same trajectory: same recipe, variant, starting delta and world size."""
        saved, now = state["config"], asdict(self.cfg)
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_FIXED if _norm(saved.get(k)) != _norm(now[k])]
        if state["variant"] != self.variant:
            changed.append(f"variant: {state['variant']} -> {self.variant}")
        if init is not None and str(Path(init).resolve()) != state["init"]:
            changed.append(f"init: {state['init']} -> {init}")
        if state["world_size"] != self.dist.world:
            changed.append(f"world size: {state['world_size']} -> {self.dist.world}")
        if changed:
            raise ValueError(f"{folder}: resume with the options it was started with ({'; '.join(changed)})")

    def _resume(self, folder: Path, state: dict) -> None:
        load_delta(self.model, read_delta(folder), str(folder))
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(load_state(folder / RNG_FILE.format(rank=self.dist.rank))["state"])
        self.step = state["step"]
        log.info("resumed from %s at step %d of %d", folder, self.step, self.total)

    # ------------------------------------------------------------------------------------------------------ steps
    def _micro_batches(self):
        """This rank's micro-batches from the current step on, across epochs (the order depends on seed only)."""
        per_epoch = len(self.sampler)
        micro = self.step * self.cfg.grad_accum
        epoch, index = divmod(micro, per_epoch)
        while True:
            batches = self.sampler.epoch(epoch)
            yield from batches[index:]
            epoch, index = epoch + 1, 0

    def _forward(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        examples = self.data.examples(indices)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with ctx:
            loss, accuracy = (self.engine if self.engine is not None else self.model)(examples)
        # Every trained tensor takes part in every step, with a zero gradient when unused (the projector in a
        # text-only batch): ranks then reduce the same buckets, and AdamW treats a missing gradient as zero in both
        # paths, as the original's DeepSpeed did.
        return loss + 0.0 * sum(p.view(-1)[0] for p in self.params), accuracy

    def train_step(self, batches) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches -> (loss, token accuracy, grad norm), rank-averaged."""
        accum = self.cfg.grad_accum
        totals = torch.zeros(2)
        for _ in range(accum):
            loss, acc = self._forward(next(batches))
            if self.engine is not None:
                self.engine.backward(loss)
                self.engine.step()
            else:
                (loss / accum).backward()
            totals += torch.stack([loss.detach().float().cpu(), acc.detach().float().cpu()]) / accum
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss, acc = self.dist.mean(totals.to(self._reduce_device)).tolist()
        return loss, acc, norm

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if self.dist.world > 1 and self.device.type == "cuda" else torch.device("cpu")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def save_every(self) -> int:
        """--save-every as given (0: only at the end), else a tenth of the run."""
        if self.cfg.save_every is not None:
            return self.cfg.save_every
        return max(1, -(-self.total // AUTO_SAVES))

    def fit(self, stop_after: int | None = None, progress: bool = True) -> TrainResult:
        """Train to the last step (or to `stop_after` steps, then checkpoint: a later --resume carries on).

        SIGINT and SIGTERM (Ctrl-C, a scheduler's kill) finish the step in progress, checkpoint and return with
        `interrupted` set, so a stopped run loses at most one step.
        """
        end = self.total if stop_after is None else min(self.total, stop_after)
        result = TrainResult(self.out, self.step, self.total, skipped=self.data.skipped)
        samples = self.cfg.micro_batch_size * self.cfg.grad_accum * self.dist.world
        batches = self._micro_batches()
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "train_config.json", asdict(self.cfg))
        with TrainLog(self.out / "logs", self.step, self.total, enabled=self.dist.main, progress=progress) as tlog:
            with StopOnSignal() as stop:
                while self.step < end and not self._agree(stop.signal):
                    start = time.perf_counter()
                    lr = self.lr
                    loss, acc, norm = self.train_step(batches)
                    record = {
                        "step": self.step,
                        "loss": loss,
                        "accuracy": acc,
                        "lr": lr,
                        "grad_norm": norm,
                        "samples_per_s": samples / (time.perf_counter() - start),
                    }
                    result.history.append(record)
                    tlog.update(record, log_line=self.step % self.cfg.log_every == 0)
                    if self.save_every and self.step % self.save_every == 0 and self.step < end:
                        self._save_intermediate()
                result.interrupted = stop.signal
        if result.interrupted:
            log.warning("%s: checkpointing at step %d", result.interrupted, self.step)
        if self.step == self.total:
            self.save(self.out)
            self._drop_spare_checkpoints(keep=None)  # the final state is whole
        else:
            self._save_intermediate()
        result.step = self.step
        return result

    def _save_intermediate(self) -> None:
        """checkpoint-N; older ones go once it is whole (with the default interval)."""
        self._drop_spare_checkpoints(keep=self.save(self.out / f"checkpoint-{self.step:06d}"))

    def _drop_spare_checkpoints(self, keep: Path | None) -> None:
        """With the default interval only the newest whole state is kept (at 7B each checkpoint is gigabytes);
        an explicit --save-every keeps them all."""
        if self.cfg.save_every is not None or not self.dist.main:
            return
        for old in self.out.glob("checkpoint-*"):
            if old != keep and CHECKPOINT.match(old.name):
                shutil.rmtree(old, ignore_errors=True)

    def _agree(self, signal_name: str | None) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step to save together)."""
        if self.dist.world == 1:
            return signal_name is not None
        flag = torch.tensor([1.0 if signal_name else 0.0], device=self._reduce_device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())


def _write_failure(err: Exception) -> str:
    """Why a save failed, in words: torch and safetensors report a full disk as a bare 'write failed'."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "the disk is full"
    text = " ".join(str(err).split())
    if "write failed" in text or "No space left" in text or "File too large" in text:
        return "a write failed: is the disk full?"
    return f"{type(err).__name__}: {text[:200]}"


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: Path, folder: Path, into_out: bool) -> None:
    """Put a marked temporary checkpoint in place: one rename for a checkpoint-N folder; into --out (which holds logs
    and checkpoints too) file by file, the old marker dropped first and the new one moved last."""
    if not into_out:
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():  # the same step saved again (a finished run resumed): swap, then drop the old one
            folder.replace(old)
        tmp.replace(folder)
        shutil.rmtree(old, ignore_errors=True)
        return
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder / DS_DIR, ignore_errors=True)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):
        path.replace(folder / path.name)
    tmp.rmdir()


def _norm(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True, **run) -> TrainResult:
    """Build a Trainer (`run`: see Trainer's keyword arguments) and train; the final delta lands in `out`."""
    return Trainer(cfg, **run).fit(stop_after=stop_after, progress=progress)
