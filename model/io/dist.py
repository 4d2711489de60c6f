"""Where this process stands among the processes of one job, as torchrun (or DeepSpeed's launcher) says in the
environment: the one reading of RANK / WORLD_SIZE / LOCAL_RANK for training, inference and the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes what one process of the job writes (logs, merged results)."""
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """This process's place; a process started by hand is a world of one."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
