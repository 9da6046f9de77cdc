"""Multi-process runs with torch.distributed, started by `torchrun`.

`torchrun --nproc_per_node=N -m augsvhn train ...` starts N copies of the command and sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each one's environment. `init_distributed` reads
them, joins the process group (NCCL on GPUs, Gloo on the CPU) and returns a `DistributedContext`. Without
those variables it returns `SINGLE_PROCESS`, whose collectives do nothing, so that callers need no second code
path. See docs/distributed.md for the commands.

Every collective below must be called by all ranks in the same order. `DistributedContext.all_or_none` turns an
exception on one rank into an exception on every rank, so that no rank waits forever at the next collective
for a rank that has already failed.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from augsvhn.errors import AugsvhnError

logger = logging.getLogger("augsvhn.distributed")

# Environment variables that torchrun (PyTorch 2.14) sets in every process it starts, besides LOCAL_WORLD_SIZE.
# init_process_group(init_method="env://") reads the first four.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and device of this process; the collectives are no-ops in a single process."""

    rank: int = 0  # global rank, 0..world_size-1; rank 0 writes logs, checkpoints, manifests
    world_size: int = 1  # number of processes over all nodes
    local_rank: int = 0  # rank on this node; selects the GPU cuda:<local_rank>
    device: str = "cpu"  # "cpu" or "cuda:<local_rank>"
    backend: str | None = None  # "nccl" or "gloo"; None when no process group was started

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes shared files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is running, so that the collectives communicate."""
        return self.backend is not None

    def barrier(self) -> None:
        """Wait until every rank reaches this call."""
        if self.active:
            torch.distributed.barrier()

    def sync_errors(self, error: BaseException | None) -> None:
        """Exchange the outcome of a step between all ranks; raise on every rank when any rank failed.

        A rank that failed re-raises its own `error`. The others raise AugsvhnError with the first failed rank's
        message. When no rank failed this is a barrier.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        message = None if error is None else (str(error) or type(error).__name__)
        messages: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(messages, message)
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed:
            rank, text = failed[0]
            raise AugsvhnError(f"rank {rank} failed, so rank {self.rank} stops too: {text}")

    @contextlib.contextmanager
    def all_or_none(self) -> Iterator[None]:
        """Run a block on every rank and then raise on every rank if the block raised an Exception on any.

        Blocks that only rank 0 runs (taking a lock, writing a file) go inside, so that the other ranks learn of
        a failure instead of waiting at the next collective.
        """
        try:
            yield
        except Exception as error:
            self.sync_errors(error)
            raise  # sync_errors re-raises `error`; this line only keeps type checkers content
        self.sync_errors(None)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the element-wise mean of `tensor` over all ranks (a copy; `tensor` is left unchanged)."""
        total = tensor.detach().clone()
        if self.active:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
            total /= self.world_size
        return total

    def broadcast_float(self, value: float) -> float:
        """Return rank 0's `value` on every rank, so that decisions based on timing agree between ranks."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())


SINGLE_PROCESS = DistributedContext()


def torchrun_environment(environ: dict[str, str] | None = None) -> dict[str, int | str] | None:
    """Return the torchrun variables of this process, or None when it was not started by torchrun.

    Raises AugsvhnError when only some variables are set or a rank is out of range, which happens when a
    launcher other than torchrun sets them partly.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise AugsvhnError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}; start distributed runs with "
            f"torchrun, or unset these variables to run one process"
        )
    try:
        values = {name: int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    except ValueError as error:
        raise AugsvhnError(f"invalid torchrun environment variable ({error}); it must be an integer") from error
    values["LOCAL_WORLD_SIZE"] = int(environ.get("LOCAL_WORLD_SIZE", values["WORLD_SIZE"]))
    advice = "start distributed runs with torchrun, which sets consistent values"
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise AugsvhnError(
            f"RANK={values['RANK']} is outside 0..WORLD_SIZE-1 with WORLD_SIZE={values['WORLD_SIZE']}; {advice}"
        )
    if not 0 <= values["LOCAL_RANK"] < values["LOCAL_WORLD_SIZE"]:
        raise AugsvhnError(
            f"LOCAL_RANK={values['LOCAL_RANK']} is outside 0..LOCAL_WORLD_SIZE-1 "
            f"with LOCAL_WORLD_SIZE={values['LOCAL_WORLD_SIZE']}; {advice}"
        )
    return {**values, "MASTER_ADDR": environ["MASTER_ADDR"]}


def process_device(device: str, local_rank: int) -> str:
    """Return the device of the process with `local_rank`: "cpu", or the GPU "cuda:<local_rank>".

    `device` is the command's --device value: "auto" (a GPU when PyTorch finds one), "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"invalid device {device!r} for a torchrun process; use auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise AugsvhnError("device 'cuda' requested, but PyTorch finds no CUDA device; use --device cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise AugsvhnError(
            f"local rank {local_rank} needs GPU cuda:{local_rank}, but this node has {count} GPU(s); "
            f"start at most {count} processes per node (--nproc_per_node={count})"
        )
    return f"cuda:{local_rank}"


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the torchrun process group and return this process's context; SINGLE_PROCESS without torchrun.

    Uses the NCCL backend when the process runs on a GPU (cuda:<LOCAL_RANK>, made the current device) and Gloo
    on the CPU. `timeout_minutes` bounds how long a collective waits for the other ranks before it fails.
    A torchrun run with one process (WORLD_SIZE=1) also returns SINGLE_PROCESS. Call `shutdown` at the end,
    or use `distributed_session`.
    """
    environment = torchrun_environment()
    if environment is None or environment["WORLD_SIZE"] == 1:
        return SINGLE_PROCESS
    local_rank = int(environment["LOCAL_RANK"])
    process_device_name = process_device(device, local_rank)
    backend = "nccl" if process_device_name.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(process_device_name)
    torch.distributed.init_process_group(
        backend=backend,
        init_method="env://",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    context = DistributedContext(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=process_device_name,
        backend=backend,
    )
    logger.debug(
        "rank %d of %d joined the %s process group at %s:%s on %s",
        context.rank, context.world_size, backend, environment["MASTER_ADDR"], environment["MASTER_PORT"],
        process_device_name,
    )
    return context


def shutdown(context: DistributedContext) -> None:
    """Leave the process group of `context`, if one was started."""
    if context.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def quiet_other_ranks(context: DistributedContext) -> None:
    """Keep the info and debug messages of the "augsvhn" logger to rank 0; other ranks log warnings and errors.

    Messages of every rank get a "rank <r>" prefix when the run has more than one process.
    """
    if context.world_size == 1:
        return
    package_logger = logging.getLogger("augsvhn")
    if not context.is_main:
        package_logger.setLevel(max(package_logger.getEffectiveLevel(), logging.WARNING))
    rank_filter = _RankPrefix(context.rank)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, _RankPrefix) for existing in handler.filters):
            handler.addFilter(rank_filter)


class _RankPrefix(logging.Filter):
    """Logging filter that puts "rank <r>: " in front of every message."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistributedContext]:
    """Join the torchrun process group (if any) for the length of a block and leave it at the end."""
    context = init_distributed(device)
    quiet_other_ranks(context)
    try:
        yield context
    finally:
        shutdown(context)
