"""One process per card, started by `python -m paddle.distributed.launch` (gloo on CPU, NCCL on GPU).

Rank 0 alone writes logs, checkpoints and outputs; the data is sharded per rank (see data.py), and
gradients are all-reduced once per optimizer step by paddle.DataParallel (`no_sync` inside accumulation).

When a rank dies, the others do not hang: gloo fails their next collective at once (the peer's connection
is reset; a peer that stops answering fails it after gloo's 30 s timeout), and paddle.distributed.launch
stops the other workers within a few seconds (SIGTERM, then SIGKILL after 3 s). A collective that fails in
Python code here becomes one `error:` line (faults.RunError).
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


def planned():
    """Who we are from the launcher's environment, without starting the process group (the memory plan alone)."""
    return Context(rank=int(os.environ.get("PADDLE_TRAINER_ID", "0")),
                   world_size=int(os.environ.get("PADDLE_TRAINERS_NUM", "1")), device=paddle.get_device())


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


@contextlib.contextmanager
def _collective(what, ctx):
    try:
        yield
    except Exception as e:
        from .faults import RunError, first_line

        raise RunError(f"rank {ctx.rank}: {what} across {ctx.world_size} processes failed; another process has "
                       f"probably died (see its log): {first_line(e)}") from None


def barrier(ctx):
    if ctx.world_size > 1:
        with _collective("waiting for the other processes", ctx):
            dist.barrier()


def leave(ctx):
    """After a run's last collective: every rank leaves the process group now, together, instead of in whatever order
    the interpreter tears things down at exit (a 2-process gloo run was seen to abort at exit, once in about 50)."""
    if ctx.world_size > 1:
        with _collective("leaving the process group", ctx):
            dist.destroy_process_group()


def sum_across_ranks(values, ctx):
    """Element-wise sums of a list of python floats over all ranks, in one all-reduce."""
    if ctx.world_size == 1:
        return list(values)
    t = paddle.to_tensor(values, dtype="float64")
    with _collective("the per-step all-reduce", ctx):
        dist.all_reduce(t)
    return t.numpy().tolist()


def broadcast_int(value, ctx):
    """Rank 0's value of a python int on every rank (e.g. a seed drawn at random)."""
    if ctx.world_size == 1:
        return value
    t = paddle.to_tensor([value], dtype="int64")
    dist.broadcast(t, src=0)
    return int(t.item())
