"""Several processes under torchrun: set-up, barriers, and sharing a list between the processes. Skip on a
first reading.

Everything here is a no-op in a single process (torchrun sets RANK; without it there is one process). What
is the paper's path stays in train.py: `gather_with_grad` (the loss contrasts the global batch) and why the
gradient is summed. One process per GPU; the process group serves CPU tensors with gloo and CUDA tensors
with NCCL, so a collective never fails on which device a small bookkeeping tensor lives on.
"""
import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Under torchrun (a process group is set up), even with one process: `torchrun --nproc_per_node 1` on one
    GPU then runs every collective the code calls, through NCCL on CUDA tensors, as several GPUs would."""
    return dist.is_available() and dist.is_initialized()


def backend_for(device: torch.device) -> str:
    """gloo on the CPU; on CUDA, NCCL for CUDA tensors and gloo for CPU ones (NCCL alone refuses CPU tensors)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). Under torchrun, joins the process group (once) and takes
    GPU LOCAL_RANK; otherwise (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        # A generous timeout: rank 0 may probe videos or build the frame store while the others wait.
        dist.init_process_group(backend_for(device), timeout=timedelta(hours=2))
        # Left to the interpreter's exit, the group's threads can be torn down while still joinable, which
        # aborts the process (SIGABRT, "terminate called without an active exception") after its work is done.
        atexit.register(_leave_process_group)
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def processes_per_machine() -> int:
    """The processes torchrun started on this machine (they share its CPUs)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", rank_and_world_size()[1]))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_first_process(value):
    """Rank 0's `value`, in every process (a refusal found by rank 0 then stops every process)."""
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def sum_over_processes(count: int) -> int:
    """The sum of an integer over all processes."""
    return sum(gather_objects(int(count)))


def gather_objects(value) -> list:
    """Every process's `value` (any picklable object), in rank order: [value] in a single process."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def join_shares(mine: torch.Tensor, total: int) -> torch.Tensor:
    """mine (rows of this process, ...) -> (total, ...): process r computed rows r, r + W, r + 2W, ... of `total`
    rows, and every process gets all rows, in order. A process whose share is empty (fewer rows than processes) may
    pass a tensor of any shape with no rows."""
    if not is_distributed():
        return mine
    world_size = dist.get_world_size()
    shares = gather_objects(mine.cpu())
    nonempty = [share for share in shares if share.numel()]
    if not nonempty:
        return mine.new_empty(0)
    joined = nonempty[0].new_empty((total, *nonempty[0].shape[1:]))  # (total, ...)
    for rank, share in enumerate(shares):
        if share.numel():
            joined[rank::world_size] = share
    return joined
