"""Several processes on one job (``torchrun`` / ``accelerate launch``), or just one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass
class Distributed:
    """Rank, world size and a barrier; a no-op for a single process.

    ``torchrun`` and ``accelerate launch`` both set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. The process group uses gloo, which needs no GPU: it only synchronises the
    processes (each one runs its own model on its own device).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _initialised: bool = False

    @classmethod
    def from_environment(cls, timeout_hours: float = 48.0) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        info = cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=world,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
            info._initialised = True
        return info

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str | None:
        """This process's GPU under a multi-process launch; None lets the model choose."""
        import torch

        if self.world_size > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return None

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._initialised = False
