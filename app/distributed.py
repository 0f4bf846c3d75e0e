"""Data-parallel training on PyTorch's own runtime.

`torchrun` (by hand, under Slurm's `srun`, or started by `recon fit --nproc N`) starts one process a rank and
describes the group in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); recon joins it with
`torch.distributed` (NCCL between GPUs, gloo between CPUs). Every rank holds the same field: it starts from
rank 0's weights, every step's gradients are summed in place (an all-reduce each, launched together), and every
decision that must not drift (the schedules' clock, a stop, a skipped or shrunk step) travels with them. Only
rank 0 writes the run folder and talks to the user.

A rank that dies closes its sockets and the others' next collective fails at once; a rank that hangs is given
up after COLLECTIVE_TIMEOUT seconds. Either way the survivors end with one line naming what happened.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from recon.app.run import UserError

COLLECTIVE_TIMEOUT = 600.0  # seconds a rank silent is given up after (RECON_COLLECTIVE_TIMEOUT; the README)


class RankFailed(RuntimeError):
    """A collective failed: another rank died, or stayed silent for COLLECTIVE_TIMEOUT."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Iterable[Any]) -> list[Any]:
        """This rank's part of `items`: every size-th one from its rank (a stride keeps the parts balanced)."""
        return list(items)[self.rank :: self.size]


_world = World()


def world() -> World:
    return _world


def join(device_kind: str = "auto") -> World:
    """Join the process group the environment describes (nothing to join for one process). Ranks other than 0
    stay quiet on stdout: the user reads rank 0."""
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return _world
    _world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available() and device_kind != "cpu"
    if cuda:
        torch.cuda.set_device(_world.local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=collective_timeout()))
    if not _world.main:
        sys.stdout = open(os.devnull, "w")
    return _world


def collective_timeout() -> float:
    """RECON_COLLECTIVE_TIMEOUT (seconds), checked, else COLLECTIVE_TIMEOUT."""
    text = os.environ.get("RECON_COLLECTIVE_TIMEOUT")
    if text is None:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"RECON_COLLECTIVE_TIMEOUT={text!r}: must be a positive number of seconds")
    return seconds


def leave() -> None:
    """Leave the group together: a rank that tears down gloo while another still talks to it can abort."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def _collective(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RankFailed(f"rank {_world.rank} of {_world.size}: another rank stopped or went silent "
                         f"(a collective failed: {reason})") from None


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the ranks, in place (every rank gets the same bits)."""
    if _world.distributed:
        _collective(dist.all_reduce, tensor)


def all_reduce_gradients(params, values):
    """Sum every rank's gradients of `params`, and `values`, in place: one all-reduce a gradient (launched
    together, no flat copy) and one of the few numbers the ranks must agree on. A parameter no rank has a
    gradient for keeps None, as Adam skips it in one process too. Returns the summed values."""
    if not _world.distributed:
        return [float(v) for v in values]
    device = params[0].device
    grads = [p.grad.contiguous() if p.grad is not None else torch.zeros_like(p) for p in params]
    tail = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device)
                        for v in [p.grad is not None for p in params] + list(values)])
    works = [_collective(dist.all_reduce, t, async_op=True) for t in grads + [tail]]
    for work in works:
        _collective(work.wait)
    summed = tail.tolist()  # one host sync
    for param, grad, learnt in zip(params, grads, summed):
        param.grad = grad if learnt else None
    return summed[len(params) :]


def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values into every rank's `tensors` (in place)."""
    if _world.distributed:
        for tensor in tensors:
            _collective(dist.broadcast, tensor, 0)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0, in rank order; None elsewhere."""
    if not _world.distributed:
        return [obj]
    gathered = [None] * _world.size if _world.main else None
    _collective(dist.gather_object, obj, gathered, 0)
    return gathered


def from_main(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    if not _world.distributed:
        return obj
    box = [obj]
    _collective(dist.broadcast_object_list, box, 0)
    return box[0]


def first_error(message: str | None) -> str | None:
    """Agree on failing: the first rank's error message, if any rank has one (every rank gets it)."""
    if not _world.distributed:
        return message
    messages = [None] * _world.size
    _collective(dist.all_gather_object, messages, message)
    return next((m for m in messages if m), None)


def barrier() -> None:
    if _world.distributed:
        _collective(dist.barrier)
