"""Which process of a multi-process launch this is (torchrun, accelerate launch), and the few
collectives the stage outputs need.

torchrun and accelerate launch set RANK, WORLD_SIZE and LOCAL_RANK in every process they start;
a plain `python -m stages.<stage>` has none of them and is rank 0 of 1. Once torch.distributed is
initialised (by `join_process_group` or by the trainer), it is the authority.

Only the main process (rank 0) writes under runs/ (align/runs.py: `stage_output`); the others train
and wait at `barrier`. The process group is joined before the trainer starts, because the stage
folder must exist before any rank reaches the trainer, and it is joined with a long timeout
(`DDP_TIMEOUT_S`): rank 0 alone saves and merges the model and scores held-out data while the
other ranks wait at the final barrier, and transformers passes `ddp_timeout` to the process
group only on GPUs (on CPU it keeps torch's 30 minutes).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from datetime import timedelta

TRANSFORMERS_DEFAULT_DDP_TIMEOUT_S = 1800  # TrainingArguments.ddp_timeout's default
DDP_TIMEOUT_S = 3 * 3600  # rank 0 saving/merging a large model and scoring held-out pairs while others wait


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _torch_distributed():
    """torch.distributed when it is initialised, else None (never imports torch for a plain run)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def current() -> Processes:
    dist = _torch_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist is not None:
        return Processes(dist.get_rank(), dist.get_world_size(), local_rank)
    return Processes(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank)


def ddp_timeout_s(configured: int | None) -> int:
    """The user's ddp_timeout when they changed it, else DDP_TIMEOUT_S (see the module docstring)."""
    if configured and configured != TRANSFORMERS_DEFAULT_DDP_TIMEOUT_S:
        return int(configured)
    return DDP_TIMEOUT_S


def join_process_group(timeout_s: int = DDP_TIMEOUT_S) -> None:
    """Initialise torch.distributed from the launcher's environment (gloo on CPU, nccl on GPUs) unless
    it is already up or this is a single process. accelerate and the trainer reuse this group."""
    if current().world_size <= 1 or _torch_distributed() is not None:
        return
    import torch
    import torch.distributed as dist

    from align import hardware

    if hardware.has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # nccl collectives use the current device
    dist.init_process_group(backend="nccl" if hardware.has_cuda() else "gloo", timeout=timedelta(seconds=timeout_s))


def barrier() -> None:
    dist = _torch_distributed()
    if dist is not None:
        dist.barrier()


def from_main(value):
    """Rank 0's `value` on every rank (itself when single-process)."""
    dist = _torch_distributed()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(items: list, work) -> list:
    """`work` (a list in, a list of as many results out) over every rank's `items` at once, run by
    rank 0 alone; each rank gets the results of its own items back. The ranks' items are joined in
    rank order, which is the order of the global batch TRL's samplers hand out (rank 0 the first
    share): one call on rank 0 sees what a single process would. Single-process: `work(items)`."""
    dist = _torch_distributed()
    if dist is None:
        return work(list(items))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(items))
    joined = [item for part in everyone for item in part]
    results = from_main(work(joined) if dist.get_rank() == 0 else None)
    start = sum(len(part) for part in everyone[: dist.get_rank()])
    return results[start : start + len(everyone[dist.get_rank()])]


def sharding_launcher() -> str | None:
    """The variable by which `accelerate launch` asked for DeepSpeed or FSDP (ACCELERATE_USE_DEEPSPEED,
    ACCELERATE_USE_FSDP), or None. For code that does not train through accelerate and so could
    not apply that sharding."""
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        if os.environ.get(name, "").lower() == "true":
            return name
    return None


def describe_all() -> str:
    """`rank 0 pid 12 on host, rank 1 pid 13 on host`, gathered from every rank: proof that they all ran."""
    me = f"rank {current().rank} pid {os.getpid()} on {socket.gethostname()}"
    dist = _torch_distributed()
    if dist is None:
        return me
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return ", ".join(everyone)


def single_process_refusal(tool: str, why: str) -> str | None:
    """Why a single-process tool (or mode) stops under a multi-process launch, in one line; None
    in a single process."""
    world_size = current().world_size
    if world_size <= 1:
        return None
    return (f"{tool} runs as a single process ({why}) but was started as {world_size} processes "
            f"(WORLD_SIZE={world_size}); run it without torchrun / accelerate launch")


# Data parallelism by hand, for the PPO update (align/ppo.py), which calls the policy and the
# critic's trunk and head directly instead of through a DDP-wrapped forward. Hand-written: DDP
# averages gradients only for modules trained through its own wrapper's forward.


def my_rows(count: int):
    """This rank's share of `count` rows: a tensor of row indices, rank r the r-th of world_size
    nearly equal contiguous parts, so shares joined in rank order are the rows in order. All rows
    in a single process."""
    import torch

    me = current()
    return torch.tensor_split(torch.arange(count), me.world_size)[me.rank]


def gather_rows(tensor):
    """Every rank's `tensor` (computed on its `my_rows` share) joined in rank order, on every rank:
    the tensor of all rows. Itself in a single process."""
    dist = _torch_distributed()
    if dist is None:
        return tensor
    import torch

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, tensor.cpu())
    return torch.cat(everyone).to(tensor.device)


def sum_gradients(parameters) -> None:
    """Add up every rank's gradients of `parameters` in place, in one flat all-reduce: ranks whose
    losses are shares of one global loss then each hold that loss's gradient. A no-op in a single
    process. Every rank must pass the same parameters with the same gradients present."""
    dist = _torch_distributed()
    if dist is None:
        return
    import torch

    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
