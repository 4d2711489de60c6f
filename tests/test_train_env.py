"""The training loop's environment helpers: RNG state through a checkpoint file, device choice, step count, the
rank-mean of logged values."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from model.config import TrainConfig
from model.train.checkpoints import load_state
from model.train.distributed import Dist, rng_state, select_device, set_rng_state
from model.train.optim import total_steps


def draws() -> tuple[list[float], torch.Tensor]:
    return [random.random() for _ in range(3)], torch.rand(3)


def test_rng_state_round_trips_through_a_weights_only_checkpoint_file(tmp_path):
    """What a resumed run restores: the draws after the save are the draws after loading it back."""
    random.seed(1)
    torch.manual_seed(1)
    torch.save({"run_id": "r", "step": 1, "state": rng_state()}, tmp_path / "rng-0.pt")
    want = draws()
    random.seed(2)
    torch.manual_seed(2)
    set_rng_state(load_state(tmp_path / "rng-0.pt")["state"])
    got = draws()
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_select_device_follows_deepspeed_precision_and_refuses_float16():
    assert select_device(None, None, {"bf16": {"enabled": True}}, 0) == (torch.device("cpu"), torch.bfloat16)
    assert select_device("cpu", torch.bfloat16, {}, 0) == (torch.device("cpu"), torch.float32)  # its config wins
    assert select_device("cpu", None, None, 0) == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        select_device("cpu", torch.float16, None, 0)


def test_total_steps_counts_optimizer_steps_unless_max_steps():
    cfg = TrainConfig.for_stage(1, datasets=["x"], epochs=3, grad_accum=2)
    assert total_steps(cfg, micro_batches_per_epoch=5) == 7  # 15 micro-batches, 2 per step
    assert total_steps(cfg, micro_batches_per_epoch=0) == 1
    assert total_steps(replace(cfg, max_steps=4), micro_batches_per_epoch=5) == 4


def _rank_mean(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        values = torch.tensor([1.0 + rank, 10.0 * rank])
        results[rank] = (Dist(rank, 2).mean(values).tolist(), values.tolist())
    finally:
        torch.distributed.destroy_process_group()


def test_rank_mean_averages_over_ranks_and_leaves_the_input():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_mean, args=(port, results), nprocs=2)
        got = dict(results)
    assert got == {0: ([1.5, 5.0], [1.0, 0.0]), 1: ([1.5, 5.0], [2.0, 10.0])}
