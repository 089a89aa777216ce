"""One process per card, started by `python -m paddle.distributed.launch` (gloo on CPU, NCCL on GPU).

Rank 0 alone writes logs, checkpoints and outputs; the data is sharded per rank (see data.py), and
gradients are all-reduced once per optimizer step by paddle.DataParallel (`no_sync` inside accumulation).

When a rank dies, the others do not hang: gloo fails their next collective at once (the peer's connection
is reset; a peer that stops answering fails it after gloo's 30 s timeout), and paddle.distributed.launch
stops the other workers within a few seconds (SIGTERM, then SIGKILL after 3 s). A collective that fails in
Python code here becomes one `error:` line (faults.RunError).

Gloo's 30 s is fixed in Paddle 3.3 (neither init_parallel_env, new_group(timeout=...) nor PADDLE_PG_TIMEOUT
reach the gloo context), so a rank waiting longer than that in one collective dies. Work rank 0 does alone
(validation, a checkpoint, the final save and upload) therefore runs through `on_rank_0`: while it runs, every
rank joins a small all-reduce every few seconds, so nobody waits long in one collective, and a rank that
really dies still fails the others' next one at once. Where every rank has worked by itself for long (loading the
models, encoding its shard of the cache) they meet in `wait_for_everyone`, a barrier on the TCP store with no limit.
"""
import contextlib
import itertools
import os
import threading
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


_arrivals = itertools.count()  # wait_for_everyone's calls, the same on every rank


def wait_for_everyone(what, ctx, poll_seconds=0.5, report_seconds=60):
    """A barrier with no time limit, for where the ranks arrive far apart (each has loaded minutes of models, or
    encoded its own shard of the data): a gloo barrier gives up after 30 s. Each rank counts itself in on the launch's
    TCP store (rank 0's, the one every process joined at start-up) and polls it until every rank has; rank 0 says
    every `report_seconds` how many it still waits for. A rank 0 that dies takes the store with it: one line here."""
    if ctx.world_size == 1:
        return
    import time

    from paddle.base import core

    key = f"kandinsky_finetune/{next(_arrivals)}"
    with _collective(f"waiting for the other processes to finish {what}", ctx):
        store = core.create_or_get_global_tcp_store()
        arrived, since = store.add(key, 1), time.monotonic()
        while arrived < ctx.world_size:
            time.sleep(poll_seconds)
            arrived = store.add(key, 0)
            if ctx.is_main and time.monotonic() - since >= report_seconds and arrived < ctx.world_size:
                print(f"waiting for {ctx.world_size - arrived} of {ctx.world_size} processes to finish {what}",
                      flush=True)
                since = time.monotonic()


def leave(ctx):
    """After a run's last collective: every rank leaves the process group now, together, instead of in whatever order
    the interpreter tears things down at exit (a 2-process gloo run was seen to abort at exit, once in about 50)."""
    if ctx.world_size > 1:
        with _collective("leaving the process group", ctx):
            dist.destroy_process_group()


def raise_together(error, ctx):
    """Raise `error`, which every rank raises at this same point (they agreed on it in a collective): each leaves the
    process group first, as at the end of a run (see leave). Ranks that exited on an error apart were seen to abort
    the same way: rank 0's launcher exited 250 (-6) instead of the error's status, once in the CI suite."""
    leave(ctx)
    raise error


def sum_across_ranks(values, ctx, what="the per-step all-reduce"):
    """Element-wise sums of a list of python floats over all ranks, in one all-reduce."""
    if ctx.world_size == 1:
        return list(values)
    t = paddle.to_tensor(values, dtype="float64")
    with _collective(what, ctx):
        dist.all_reduce(t)
    return t.numpy().tolist()


def broadcast_int(value, ctx):
    """Rank 0's value of a python int on every rank (e.g. a seed drawn at random)."""
    if ctx.world_size == 1:
        return value
    t = paddle.to_tensor([value], dtype="int64")
    dist.broadcast(t, src=0)
    return int(t.item())


HEARTBEAT_SECONDS = 5  # how long a rank waits in one collective while rank 0 works alone: well inside gloo's 30 s
_WORKING, _DONE, _FAILED = 0, 1, 2


def on_rank_0(what, work, ctx):
    """`work()` on rank 0 alone, however long it takes, while the other ranks wait for it; returns its result on
    rank 0 and None on the others. `what` names the work for error lines ("writing checkpoint-4").

    Rank 0 runs `work` in a helper thread; its main thread and every other rank's join one small all-reduce each
    HEARTBEAT_SECONDS until rank 0 reports the work done or failed. A failure is raised on rank 0 as it was and
    ends the other ranks with one line; a rank that dies meanwhile fails the others' next all-reduce at once.
    Signals are handled as usual: they reach the main thread, which is never blocked for long."""
    if ctx.world_size == 1:
        return work()
    outcome = []  # rank 0: [result] or [None, exception]
    thread = None
    if ctx.is_main:
        thread = threading.Thread(target=_run_into, args=(work, outcome, paddle.get_device()), name=what,
                                  daemon=True)  # a main thread that fails (a dead peer) exits without it
        thread.start()
    state = _WORKING
    while state == _WORKING:
        if thread is not None:
            thread.join(HEARTBEAT_SECONDS)
            mine = _WORKING if thread.is_alive() else _DONE if len(outcome) == 1 else _FAILED
        else:
            mine = _WORKING
        (state,) = sum_across_ranks([mine], ctx, what=f"waiting while rank 0 is {what}")
    if state == _FAILED:
        from .faults import RunError

        raise_together(outcome[1] if ctx.is_main else
                       RunError(f"rank {ctx.rank}: rank 0 failed while {what} (its log says why); stopping too"), ctx)
    return outcome[0] if ctx.is_main else None


def _run_into(work, outcome, device):
    paddle.set_device(device)  # a new thread starts on the default device (and, on GPU, CUDA device 0)
    try:
        outcome.append(work())
    except BaseException as e:  # raised in the main thread
        outcome.extend([None, e])
