"""torchrun-style process groups: read WORLD_SIZE/RANK/LOCAL_RANK, gloo on CPU, nccl on CUDA.

Launch a training script on N processes of one machine with::

    torchrun --standalone --nproc_per_node=2 -m multidiff.cli train audio ...

(`accelerate launch` sets the same environment variables and works too.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "dist_env", "init_distributed", "destroy_distributed", "all_reduce_sum", "broadcast_object"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints."""
        return self.rank == 0


def dist_env() -> DistEnv:
    """The job layout from an initialized process group, else from torchrun's environment variables."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return DistEnv(rank, int(os.environ.get("LOCAL_RANK", str(rank))), world)


def resolve_device(device: str | torch.device, env: DistEnv) -> torch.device:
    """Pin a bare `cuda` to this process's local GPU when several processes share a machine."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank if env.enabled else torch.cuda.current_device())
    return device


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> tuple[DistEnv, bool]:
    """Join the process group if launched with WORLD_SIZE>1; returns the env and whether this call created it."""
    env = dist_env()
    if not env.enabled or dist.is_initialized():
        return env, False
    if not dist.is_available():  # pragma: no cover - builds without torch.distributed
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return dist_env(), True


def destroy_distributed() -> None:
    """Leave the process group (no-op when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every process (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's picklable object, in rank order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
