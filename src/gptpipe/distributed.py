"""Training on several processes, on one machine or many: torchrun and DistributedDataParallel.

torchrun starts one process per GPU (or per share of a CPU) and sets WORLD_SIZE, RANK and
LOCAL_RANK in each; their presence is what makes a run distributed. Every process holds the
whole model and trains on its own share of each global batch; DDP averages the gradients,
so a step is that of one process on the whole batch, whatever the number of processes.
"""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from gptpipe.data import TokenWindows, collate_windows
from gptpipe.errors import PipelineError, interruption
from gptpipe.params import per_process_batch
from gptpipe.train import StopRequested

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Processes:
    """Where this process stands among those training together; the defaults are a plain run."""
    rank: int = 0
    local_rank: int = 0  # the process's index on its machine: its GPU
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone evaluates, logs and writes files."""
        return self.rank == 0


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_command(nproc: int, script: str | Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *args]


def require_devices(nproc: int, device: torch.device, cuda_devices: int) -> None:
    """On CUDA each of train.nproc processes takes a GPU of its own: there must be as many."""
    if device.type == "cuda" and nproc > cuda_devices:
        raise PipelineError(
            f"train.nproc={nproc} starts one process per GPU, but this machine has {cuda_devices} CUDA "
            f"device(s): set train.nproc to {max(cuda_devices, 1)} or fewer (or train.device: cpu to train "
            f"several processes on the CPU)")


def run_torchrun(nproc: int, script: str | Path, args: Sequence[str]) -> int:
    """Run `script args` as `nproc` processes on this machine through torchrun, wait, and
    return its exit status (128 + N when a signal N ended it, as a shell reports it).

    torchrun runs in its own session and gets SIGINT and SIGTERM from this process, once:
    it stops its workers with the same signal, which lets them save their state.
    """
    process = subprocess.Popen(torchrun_command(nproc, script, args), start_new_session=True)

    def forward(signum: int, frame) -> None:
        process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status if status >= 0 else 128 - status


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Processes, torch.device]]:
    """Under torchrun, join its process group (gloo on CPU, nccl on CUDA) and leave it at the
    end, also on errors; otherwise a plain single process. Yields this process's place and its
    device: cuda:LOCAL_RANK on CUDA, whichever CUDA device `device` names."""
    if not under_torchrun():
        yield Processes(), device
        return
    rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PipelineError(f"process {rank} has LOCAL_RANK {local_rank} but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s): start at most that many "
                                f"processes per machine (train.nproc or torchrun's --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise PipelineError(f"training on several processes runs on CUDA (nccl) or the CPU (gloo), "
                            f"not {device.type}: set train.device to cuda or cpu, or train.nproc to 1 "
                            f"and run without torchrun")
    try:
        yield Processes(rank, local_rank, world_size, distributed=True), device
    finally:
        dist.destroy_process_group()


def sharded_loader(tokens: np.ndarray, context_length: int, stride: int, batch_size: int,
                   processes: Processes, seed: int, pin_memory: bool = False) -> DataLoader:
    """This process's share of each global batch of `batch_size` windows.

    The DistributedSampler shuffles all windows with `seed` + epoch (set_epoch), drops the
    windows that do not fill a share for every process, and deals out the rest in turn, so
    the union of the processes' k-th batches is the k-th run of `batch_size` shuffled windows,
    whatever the number of processes.
    """
    windows = TokenWindows(tokens, context_length, stride)
    sampler = DistributedSampler(windows, num_replicas=processes.world_size, rank=processes.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    return DataLoader(windows, batch_size=per_process_batch(batch_size, processes.world_size),
                      sampler=sampler, drop_last=True, collate_fn=collate_windows, pin_memory=pin_memory)


def data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """`model` wrapped in DDP: gradients are averaged across processes in backward, except
    under its no_sync() (the micro-batches before the last of an accumulation group)."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def same_on_all(value: int, device: torch.device) -> bool:
    """Whether every process holds the same `value`."""
    bounds = torch.tensor([value, -value], device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    return int(bounds[0]) == -int(bounds[1])


class AgreedStop(StopRequested):
    """A stop request that every process honours after the same step, whichever got the signal:
    each check takes the highest signal number across processes. (Processes stopping at different
    steps would leave the others waiting forever for their gradients.)"""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.received: int | None = None  # by this process; `signal` is the agreed one

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:  # a second signal to this process: stop now
            raise interruption(signum)
        self.received = signum

    def requested(self) -> bool:
        signum = torch.tensor(self.received or 0, device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        self.signal = int(signum) or None
        return self.signal is not None
