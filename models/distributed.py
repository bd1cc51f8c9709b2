"""Data-parallel training on PyTorch's own engine: torch.distributed + DistributedDataParallel, started by
`torchrun` (gloo on the CPU, nccl on CUDA).

The contract a run keeps at any world size W:
- `--batch-size` is the global batch B; each rank computes images [r B/W, (r+1) B/W) of it (B % W == 0).
- Every rank draws the whole batch's randomness (images, t, noise, patch positions) from the run's one
  generator and takes its part, so the data and noise stream is the same at every W, and so is a resumed one.
  What still differs between world sizes: the order of the float additions that average the gradients, and
  the torch global generator of ranks > 0 (dropout), seeded from (seed, rank, step).
- Rank 0 alone writes files; `barrier` lets the others wait for it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from patchgen.runtime.errors import ArgumentError, PatchgenError

# How long a rank waits at a collective for the others: long enough for rank 0's preview and evaluation.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the rank within this machine: which GPU, and who builds this machine's image cache

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, previews and config.json."""
        return self.rank == 0

    def part(self, batch: int) -> slice:
        """This rank's images of a global batch of `batch`."""
        if batch % self.size:
            raise PatchgenError(f"the batch of {batch} images does not split evenly over {self.size} ranks; "
                                f"use a batch size that is a multiple of {self.size}, or another number of ranks")
        n = batch // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


def world() -> World:
    """This process's place in the initialised process group (World() when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_by_torchrun() -> bool:
    """True inside a torchrun (or any env:// launcher) job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    """Ranks on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_device(device: str, local_rank: int = 0, ranks_here: int = 1) -> None:
    """Fail with one line when `device` cannot be used: no CUDA in this torch or machine, a GPU index beyond
    the machine's, fewer GPUs than ranks on this machine, or one named GPU for several ranks."""
    if not device.startswith("cuda"):
        return
    given = "{device} " + device  # the argument and its value, then another value in the fix: "device cuda"
    if not torch.cuda.is_available():
        raise ArgumentError(f"{given}: this torch build or machine has no CUDA GPU; ",
                            "use {device} cpu, or install a CUDA build of torch", device=None)
    count, index = torch.cuda.device_count(), device.partition(":")[2]
    if ranks_here > 1 and index:
        raise ArgumentError(f"{given} names one GPU for {ranks_here} ranks; ",
                            "pass {device} cuda, and each rank takes the GPU of its local rank", device=None)
    if int(index or local_rank) >= count or ranks_here > count:
        raise ArgumentError(f"{given}: this machine has {count} GPU(s) for {ranks_here} rank(s) here; ",
                            f"start at most {count} ranks per machine", device=None)


def init(device: str) -> tuple[World, str]:
    """Join the process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    gloo on the CPU, nccl on CUDA. Returns the world and this rank's device ("cuda" becomes cuda:<local rank>).
    Raises PatchgenError for a device this machine cannot give every rank (`check_device`)."""
    if not dist.is_available():
        raise PatchgenError("this torch build has no torch.distributed; train in one process (without torchrun)")
    cuda = device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device, local_rank, local_world_size())
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return world(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# What gloo and NCCL say when a collective's peer has exited (gloo raises plain RuntimeErrors).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_gone(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank of the job has ended (with its own error)."""
    return world().size > 1 and (isinstance(e, dist.DistError) or any(s in str(e) for s in PEER_GONE))


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def wrap(net: torch.nn.Module) -> Optional[torch.nn.Module]:
    """`net` inside DistributedDataParallel when there is more than one rank (gradients averaged over the
    ranks in backward); None for one rank, where `net` itself trains. DDP starts from rank 0's weights."""
    if world().size == 1:
        return None
    device = next(net.parameters()).device
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)


def sync_step(loss: float, stop_signal: int) -> tuple[float, int]:
    """One collective per step: the mean of the ranks' losses (each the mean over its equal part of the
    batch, so this is the global batch's loss) and the largest signal number any rank was stopped by
    (0: none), so every rank stops after the same step and reports the same signal."""
    w = world()
    if w.size == 1:
        return loss, stop_signal
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mine = torch.tensor([loss, float(stop_signal)], dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(w.size)]
    dist.all_gather(everyone, mine)
    stacked = torch.stack(everyone)
    return stacked[:, 0].mean().item(), int(stacked[:, 1].max().item())


def gather_rng_states() -> list[torch.Tensor]:
    """Every rank's torch global generator state, in rank order (on every rank): what a checkpoint keeps so that
    a resume at the same world size restores each rank's dropout stream."""
    mine = torch.get_rng_state()
    if world().size == 1:
        return [mine]
    states = [None] * world().size
    dist.all_gather_object(states, mine)
    return states


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank `rank`'s torch global generator from (seed, rank, step), when no saved state covers it
    (numpy's SeedSequence mixes the three)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])
