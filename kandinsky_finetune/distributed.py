"""One process per card, started by `python -m paddle.distributed.launch` (gloo on CPU, NCCL on GPU).

Rank 0 alone writes logs, checkpoints and outputs; the data is sharded per rank (see data.py), and
gradients are all-reduced once per optimizer step by paddle.DataParallel (`no_sync` inside accumulation).
"""
import contextlib
import os
from dataclasses import dataclass

import paddle
import paddle.distributed as dist

from .params import UsageError


@dataclass
class Context:
    rank: int
    world_size: int
    device: str

    @property
    def is_main(self):
        return self.rank == 0


def setup(local_rank=-1):
    """Pick the device, start the process group when launched on several cards, and return who we are."""
    world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    launched_rank = os.environ.get("PADDLE_LOCAL_RANK")
    if local_rank >= 0:
        if not paddle.is_compiled_with_cuda():
            raise UsageError(f"--local_rank {local_rank} selects a GPU, but this Paddle build has no CUDA")
        if launched_rank is not None and int(launched_rank) != local_rank:
            raise UsageError(f"--local_rank {local_rank} disagrees with the launcher's local rank {launched_rank}; "
                             "drop --local_rank and choose cards with --gpus")
        if launched_rank is None:
            paddle.set_device(f"gpu:{local_rank}")
    if world_size > 1:
        dist.init_parallel_env()
    return Context(rank=dist.get_rank() if world_size > 1 else 0, world_size=world_size,
                   device=paddle.get_device())


def wrap(model, ctx):
    """DataParallel on several cards; the bare model on one."""
    return paddle.DataParallel(model) if ctx.world_size > 1 else model


def unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


def no_sync_unless(sync, model):
    """Skip the gradient all-reduce on accumulation micro-batches; only the step's last one syncs."""
    if sync or not isinstance(model, paddle.DataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def barrier(ctx):
    if ctx.world_size > 1:
        dist.barrier()


def mean_across_ranks(value, ctx):
    """Mean of a python float over all ranks (for logging the global loss)."""
    if ctx.world_size == 1:
        return value
    t = paddle.to_tensor([value], dtype="float32")
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def broadcast_int(value, ctx):
    """Rank 0's value of a python int on every rank (e.g. a seed drawn at random)."""
    if ctx.world_size == 1:
        return value
    t = paddle.to_tensor([value], dtype="int64")
    dist.broadcast(t, src=0)
    return int(t.item())
