"""Several processes on one job (``torchrun`` / ``accelerate launch``), or just one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass
class Distributed:
    """Rank, world size and a barrier; a no-op for a single process.

    ``torchrun`` and ``accelerate launch`` both set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. One setup serves every job: NCCL when the processes run on CUDA (the refine
    trainer's DistributedDataParallel needs it; barriers work on it too), else gloo.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _initialised: bool = False

    @classmethod
    def from_environment(
        cls, device: str | None = None, timeout_hours: float = 48.0
    ) -> Distributed:
        """Join the launcher's process group (or describe the single process).

        Args:
            device: the job's ``--device``; None or ``cuda...`` use CUDA when present.
            timeout_hours: how long a barrier waits for the slowest process.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        info = cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=world,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
        if not dist.is_initialized():
            backend = "gloo"
            if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
                torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
                backend = "nccl"
            dist.init_process_group(backend, timeout=timedelta(hours=timeout_hours))
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
