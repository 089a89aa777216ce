"""--sharding checkpoints: every rank's optimizer shard gathered, a tensor at a time, into rank 0's host memory, which
then writes the checkpoint alone.

Checkpoints stay in the unsharded format: rank 0 writes every rank's optimizer shard. The owners first broadcast theirs
a tensor at a time into rank 0's host memory; only then does rank 0 write the checkpoint, alone, while the others wait
in distributed.on_rank_0's short heartbeats (never in a collective that lasts as long as the writing: gloo gives up
after 30 s, and a slow disk takes longer for gigabytes). So a sharded checkpoint needs no shared file system (only rank 0's
machine has output_dir), is written and published atomically like any other, and resumes on any number of processes,
sharded or not (each rank's sharding optimizer takes its own part of the full state).
"""
import math

import paddle

from .faults import RunError, first_line


class Shard:
    """A tensor of some rank's optimizer shard: its shape and dtype known on every rank (exchanged up front), its values
    broadcast by the owner when every rank walks the state (`received` on rank 0, `take_part` on the others)."""

    def __init__(self, local, shape, dtype, owner):
        self.local, self.shape, self.owner = local, shape, owner
        self.dtype = dtype  # "paddle.float32": write_safetensors strips the prefix
        self.size = math.prod(shape)

    def element_size(self):
        return paddle.empty([1], dtype=self.dtype.replace("paddle.", "")).element_size()

    def fetch(self):
        import paddle.distributed as dist

        tensor = self.local if self.local is not None else paddle.empty(self.shape, dtype=self.dtype.replace(
            "paddle.", ""))
        dist.broadcast(tensor, src=self.owner)
        return tensor

    def numpy(self):
        return self.fetch().numpy()


def _tensors(state, path=(), shards=False):
    """(key path, tensor) of every tensor (or with `shards`, every Shard) in a nested dict, in the dict's order (the
    optimizer's: moments, beta powers, master weights)."""
    for key, value in state.items():
        if isinstance(value, Shard if shards else paddle.Tensor):
            yield path + (key,), value
        elif isinstance(value, dict):
            yield from _tensors(value, path + (key,), shards)


def gathered_state(optimizer):
    """The full optimizer state dict on rank 0, every rank's shard in it as a Shard (rank 0's own as its tensors):
    collective, so every rank calls it at the same point and then `take_part` (rank 0 `received`). Non-tensor
    entries (the lr schedule's) are rank 0's, the same on every rank."""
    import paddle.distributed as dist

    if hasattr(optimizer, "parameter_slices"):
        return optimizer.parameter_slices.joined(optimizer.state_dict())
    rank, local = dist.get_rank(), optimizer.state_dict()
    tensors = dict(_tensors(local))
    layouts = []  # (rank's non-tensor entries, {path: (shape, dtype)}) of each rank
    dist.all_gather_object(layouts, (_without_tensors(local),
                                     {path: (list(t.shape), str(t.dtype)) for path, t in tensors.items()}))
    state = layouts[0][0]  # the same skeleton on every rank, so every rank walks the shards in the same order
    for owner, (_, layout) in enumerate(layouts):
        for path, (shape, dtype) in layout.items():
            if owner == 0 and rank != 0:
                continue  # rank 0 writes its own shard: nothing to send
            table = state
            for key in path[:-1]:
                table = table.setdefault(key, {})
            table[path[-1]] = tensors[path] if owner == rank == 0 else Shard(
                tensors[path] if owner == rank else None, shape, dtype, owner)
    return state


def _without_tensors(state):
    return {k: _without_tensors(v) if isinstance(v, dict) else v for k, v in state.items()
            if not isinstance(v, paddle.Tensor)}


def received(state):
    """On rank 0: `state` with every other rank's shard fetched (the broadcasts `take_part` joins, in the dict's
    order) into host memory, before rank 0 writes any of it. Costs rank 0 the other ranks' part of the optimizer
    state in host memory for the while of the checkpoint."""
    on_gpu = "gpu" in paddle.get_device()

    def fetched(value):
        if isinstance(value, Shard):
            tensor = value.fetch()
            return tensor.cpu() if on_gpu else tensor
        return {k: fetched(v) for k, v in value.items()} if isinstance(value, dict) else value

    try:
        return fetched(state)
    except Exception as e:
        raise RunError(f"rank 0: receiving the other ranks' optimizer shards for the checkpoint failed; another "
                       f"process has probably died (see its log): {first_line(e)}") from None


def take_part(state):
    """On ranks other than 0: the broadcasts of rank 0's `received`, in its order (the dict's). A rank 0 that died
    on the way is one line here too."""
    try:
        for _, value in _tensors(state, shards=True):
            value.fetch()
    except Exception as e:
        raise RunError(f"rank {paddle.distributed.get_rank()}: sending this rank's optimizer shard to rank 0 for "
                       f"the checkpoint failed; rank 0 has probably died (see its log): {first_line(e)}") from None


def is_tensor(obj):
    """A tensor, or another rank's shard of one (which the checkpoint writes like a tensor)."""
    return isinstance(obj, (paddle.Tensor, Shard))
