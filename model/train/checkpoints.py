"""A training checkpoint, whole or absent: the delta, the trainer state and every rank's RNG state written into a
temporary folder, marked last (MARKER: run id, step, file sizes) and renamed into place; found, verified and refused
on resume here too, so a resumed run continues the very trajectory it saved.

By hand, not accelerate's save_state/load_state: those write their own layout (model.safetensors, optimizer.bin,
random_states_N.pkl), not the original's pytorch_model.pt delta, and nothing marks a save whole or absent; the
DeepSpeed engine's own save_checkpoint/load_checkpoint hold its partitioned optimizer.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError

from model.config import TrainConfig
from model.io.files import temporary_folder, write_atomically, write_failure
from model.network.checkpoint import DELTA_PT, DELTA_ST, DR_CONFIG
from model.train.distributed import Dist

STATE_FILE = "trainer_state.pt"
RNG_FILE = "rng-{rank}.pt"
MARKER = "checkpoint.json"  # written last: {run_id, step, files}; a folder without it is not a checkpoint
DS_DIR, DS_TAG = "deepspeed", "state"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAIN_CONFIG = "train_config.json"
# what a run writes into --out: a fresh run refuses an --out holding any of these unless told --overwrite
RUN_FILES = (STATE_FILE, MARKER, DELTA_PT, DELTA_ST, DR_CONFIG, TRAIN_CONFIG, DS_DIR, "logs")
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed or written; one line naming the folder or file."""


def write_json(path: Path, value: dict) -> None:
    """A run's JSON record (its options, a checkpoint's marker), whole or not at all."""
    write_atomically(path, json.dumps(value, indent=1))


def write_checkpoint(folder: Path, out: Path, identity: dict, dist: Dist, write_files: Callable[[Path], None]) -> Path:
    """`write_files(tmp)` on every rank, then (main rank) the marker and the move into `folder`, whole or not at all.
    `folder` is a checkpoint-N of `out`, or `out` itself for the final state.

    A failed write (a full disk) removes the temporary folder and is one line; earlier checkpoints stay whole.
    """
    tmp = temporary_folder(folder if folder != out else out / "final")
    try:
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        write_files(tmp)
        dist.barrier()
        if dist.main:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json(tmp / MARKER, {**identity, "files": files})
            _commit(tmp, folder, into_out=folder == out)
    except (OSError, RuntimeError, SafetensorError) as err:
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{folder}: could not write the step-{identity['step']} checkpoint ({write_failure(err)}); "
            f"earlier checkpoints are whole: free some space and --resume {out}"
        ) from err
    dist.barrier()
    return folder


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


def drop_spare_checkpoints(out: Path, keep: Path | None) -> None:
    """Every checkpoint-N of `out` but `keep` (at 7B each is gigabytes; the caller knows a newer state is whole)."""
    for old in out.glob("checkpoint-*"):
        if old != keep and CHECKPOINT.match(old.name):
            shutil.rmtree(old, ignore_errors=True)


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


def check_resumable(
    folder: Path, state: dict, cfg: TrainConfig, variant: str, init: str | Path | None, world: int
) -> None:
    """A resumed run must replay the same trajectory: same recipe, variant, starting delta and world size."""
    saved, now = state["config"], asdict(cfg)
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESUME_FIXED if _norm(saved.get(k)) != _norm(now[k])]
    if state["variant"] != variant:
        changed.append(f"variant: {state['variant']} -> {variant}")
    if init is not None and str(Path(init).resolve()) != state["init"]:
        changed.append(f"init: {state['init']} -> {init}")
    if state["world_size"] != world:
        changed.append(f"world size: {state['world_size']} -> {world}")
    if changed:
        raise ValueError(f"{folder}: resume with the options it was started with ({'; '.join(changed)})")


def _norm(value: object) -> object:
    """JSON gives lists where the config holds tuples (betas)."""
    return list(value) if isinstance(value, (list, tuple)) else value


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
