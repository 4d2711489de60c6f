"""The two-stage training loop: one process (CPU or one GPU, plain PyTorch) or many through DeepSpeed (ZeRO-2).

Both paths share everything but the optimizer step: the data (train_set.py: rows -> cached encoder features), the
batch order (batch_sampler.py), the optimizer and schedule (optim.py) and the checkpoints (checkpoints.py: the delta
plus the optimizer, scheduler, step and RNG state, so a resumed run continues the very same trajectory). This module
is the run itself, read top to bottom: build, resume, step, save.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from model.config import ModelConfig, TrainConfig
from model.data.catalog import DatasetSpec, resolve_dataset
from model.io.stop_signal import StopOnSignal
from model.media.features import FeatureCache
from model.network.checkpoint import load_delta, load_model, read_delta, save_delta
from model.network.deepresonance import DeepResonance
from model.train.batch_sampler import MixedBatchSampler
from model.train.checkpoints import (
    DS_DIR,
    DS_TAG,
    RNG_FILE,
    STATE_FILE,
    TRAIN_CONFIG,
    check_fresh_out,
    check_resumable,
    drop_spare_checkpoints,
    find_checkpoint,
    load_state,
    verify_checkpoint,
    write_checkpoint,
    write_json,
)
from model.train.distributed import (
    Dist,
    deepspeed_config,
    deepspeed_module,
    init_deepspeed_dist,
    rng_state,
    select_device,
    set_rng_state,
)
from model.train.log import TrainLog
from model.train.optim import build_optimizer, set_trainable, total_steps, warmup_steps
from model.train.train_set import TrainSet, load_train_set

log = logging.getLogger(__name__)

AUTO_SAVES = 10  # with no --save-every: a checkpoint every tenth of the run (only the newest is kept)


@dataclass
class TrainResult:
    """What `fit` did: where it wrote, how far it got, the per-step records and the rows it had to skip."""

    out: Path
    step: int
    total_steps: int
    history: list[dict] = field(default_factory=list)  # {step, loss, accuracy, lr, samples_per_s} per step
    skipped: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the signal (SIGINT, SIGTERM) that stopped the run, after it checkpointed


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
            check_resumable(checkpoint, saved, self.cfg, self.variant, init, self.dist.world)
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

    def save(self, folder: Path) -> Path:
        """Delta + optimizer/scheduler/step (+ DeepSpeed's partitioned optimizer) + every rank's RNG state, whole or
        not at all (checkpoints.write_checkpoint). The final state goes into --out itself."""
        return write_checkpoint(folder, self.out, self._identity, self.dist, self._write_state)

    @property
    def _identity(self) -> dict:
        """What every file of a checkpoint carries, so files of two saves are never taken for one."""
        return {"run_id": self.run_id, "step": self.step}

    def _write_state(self, folder: Path) -> None:
        """This rank's share of a checkpoint into `folder` (the main rank's: the delta and the trainer state)."""
        state = {
            **self._identity,
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
        torch.save({**self._identity, "state": rng_state()}, folder / RNG_FILE.format(rank=self.dist.rank))
        if self.dist.main:
            save_delta(self.model, folder, metadata={"run_id": self.run_id, "step": str(self.step)})
            torch.save(state, folder / STATE_FILE)

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
            write_json(self.out / TRAIN_CONFIG, asdict(self.cfg))
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
        """With the default interval only the newest whole state is kept; an explicit --save-every keeps them all."""
        if self.cfg.save_every is None and self.dist.main:
            drop_spare_checkpoints(self.out, keep)

    def _agree(self, signal_name: str | None) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step to save together)."""
        if self.dist.world == 1:
            return signal_name is not None
        flag = torch.tensor([1.0 if signal_name else 0.0], device=self._reduce_device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())


def train(cfg: TrainConfig, *, stop_after: int | None = None, progress: bool = True, **run) -> TrainResult:
    """Build a Trainer (`run`: see Trainer's keyword arguments) and train; the final delta lands in `out`."""
    return Trainer(cfg, **run).fit(stop_after=stop_after, progress=progress)
