"""--sharding: the training state split across the processes of a launch, on Paddle's own engines (stage 1: fleet's
sharding optimizer, CPU and GPU; stage 2: group_sharded_parallel, GPU only), and the optimizer state gathered to rank 0
for checkpoints.

Checkpoints stay in the unsharded format: rank 0 writes every rank's optimizer shard, which the owner broadcasts a
tensor at a time while rank 0 streams it to disk. So a sharded checkpoint needs no shared file system (only rank 0's
machine has output_dir), is written and published atomically like any other, and resumes on any number of processes,
sharded or not (each rank's sharding optimizer takes its own part of the full state).
"""
import math

import paddle

from .faults import RunError, first_line
from .params import UsageError

GPU_ONLY = {"stage2": "os_g"}  # group_sharded_parallel's level; Paddle asserts a GPU, XPU or custom device for it


def check(args, ctx, log):
    """Before anything loads: a stage this device cannot run is one line; on one process there is nothing to shard
    (the run says so and trains unsharded)."""
    stage = args.sharding
    if stage is None:
        return
    if stage in GPU_ONLY and "gpu" not in ctx.device:
        raise UsageError(f"--sharding {stage}: Paddle shards gradients on GPUs only (group_sharded_parallel); on "
                         f"{ctx.device} use --sharding stage1 (optimizer states)")
    if ctx.world_size == 1:
        log.warn(f"--sharding {stage}: one process, nothing to shard; training unsharded (launch several with "
                 "python -m paddle.distributed.launch)")
        args.sharding = None


def init(args, ctx):
    """Stage 1 runs on fleet's hybrid-parallel topology, every process one shard (sharding_degree = processes)."""
    if args.sharding != "stage1":
        return
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": ctx.world_size}
    fleet.init(is_collective=True, strategy=strategy)


def wrap(model, optimizer, precision, args):
    """(model, optimizer) as the stage shards them. Clipping is the optimizer's own ClipGradByGlobalNorm (see
    optimization.build_optimizer), which these wrappers turn into a clip by the norm over all shards: the gradients
    are reduced inside their step, so a clip before it would see each rank's unreduced ones."""
    if args.sharding == "stage1":
        from paddle.distributed import fleet

        optimizer = fleet.distributed_optimizer(optimizer)  # HybridParallelOptimizer(DygraphShardingOptimizer)
        if precision.scaler is not None:
            precision.scaler = fleet.distributed_scaler(precision.scaler)  # found-inf agreed by all ranks
        return fleet.distributed_model(model), optimizer
    from paddle.distributed.sharding import group_sharded_parallel

    model, optimizer, scaler = group_sharded_parallel(model, optimizer, GPU_ONLY[args.sharding],
                                                      scaler=precision.scaler)
    precision.scaler = scaler  # (GroupShardedScaler around an fp16 loss scaler, or None)
    # Stage 2 keeps the gradients in buffers of its own and replaces clear_grad with one that zeroes them and takes
    # no argument; the loop's clear_grad(set_to_zero=False) reaches it through this
    clear = optimizer.clear_grad
    optimizer.clear_grad = lambda set_to_zero=True: clear()
    # ... and its set_state_dict hands the whole state to AdamW, which would keep every rank's part: keep this rank's
    own = {name for name, rank in optimizer.param2rank.items() if rank == optimizer._rank}
    restore = optimizer.set_state_dict
    optimizer.set_state_dict = lambda state: restore(_part(state, own))
    return model, optimizer


def _part(state, own):
    """The entries of an optimizer state dict (keyed `<parameter name>_<accumulator>_0`, or by parameter name in
    master_weights) that belong to the parameters named in `own`; the rest (the lr schedule's) as they are."""
    def mine(key):
        return key in own or any(key.startswith(f"{name}_") for name in own)

    return {k: _part(v, own) if isinstance(v, dict) and k == "master_weights" else v for k, v in state.items()
            if not isinstance(v, paddle.Tensor) or mine(k)}


def innermost(optimizer):
    """The paddle.optimizer.AdamW inside the sharding wrappers (fleet's: _inner_opt; group_sharded's: _optim)."""
    while hasattr(optimizer, "_inner_opt") or hasattr(optimizer, "_optim"):
        optimizer = getattr(optimizer, "_inner_opt", None) or optimizer._optim
    return optimizer


def accumulators(optimizer):
    """(tensor count, bytes) of the optimizer state this rank holds, read from the optimizer's own tables (the moments
    and beta powers Paddle created on this rank)."""
    tensors = [t for table in innermost(optimizer)._accumulators.values() for t in table.values()]
    return len(tensors), sum(t.size * t.element_size() for t in tensors)


def log_shares(optimizer, log):
    """After the first step (when Paddle has created the optimizer state): one line with each rank's part of it.
    Collective."""
    import paddle.distributed as dist

    shares = []
    dist.all_gather_object(shares, accumulators(optimizer))
    log("optimizer state per process (--sharding): " + ", ".join(
        f"rank {rank} {size / 1e6:.3f} MB in {count} tensors" for rank, (count, size) in enumerate(shares)))


# ---------------------------------------------------------------- checkpoints: the shards gathered to rank 0
class _Shard:
    """A tensor of some rank's optimizer shard, as write_safetensors sees it: its shape and dtype known on every rank
    (exchanged up front), its values broadcast by the owner when rank 0 writes it, one tensor at a time."""

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
    """(key path, tensor) of every tensor (or with `shards`, every _Shard) in a nested dict, in the dict's order (the
    optimizer's: moments, beta powers, master weights)."""
    for key, value in state.items():
        if isinstance(value, _Shard if shards else paddle.Tensor):
            yield path + (key,), value
        elif isinstance(value, dict):
            yield from _tensors(value, path + (key,), shards)


def gathered_state(optimizer):
    """The full optimizer state dict on rank 0, every rank's shard in it as a _Shard (rank 0's own as its tensors):
    collective, so every rank calls it at the same point and then `take_part` (rank 0 writes instead). Non-tensor
    entries (the lr schedule's) are rank 0's, the same on every rank."""
    import paddle.distributed as dist

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
            table[path[-1]] = tensors[path] if owner == rank == 0 else _Shard(
                tensors[path] if owner == rank else None, shape, dtype, owner)
    return state


def _without_tensors(state):
    return {k: _without_tensors(v) if isinstance(v, dict) else v for k, v in state.items()
            if not isinstance(v, paddle.Tensor)}


def take_part(state):
    """On ranks other than 0: the broadcasts of rank 0's writing, in its order (the dict's, as write_safetensors
    walks it). A rank 0 that died on the way is one line here too."""
    try:
        for _, value in _tensors(state, shards=True):
            value.fetch()
    except Exception as e:
        raise RunError(f"rank {paddle.distributed.get_rank()}: sending this rank's optimizer shard to rank 0 for "
                       f"the checkpoint failed; rank 0 has probably died (see its log): {first_line(e)}") from None


def is_tensor(obj):
    """A tensor, or another rank's shard of one (which the checkpoint writes like a tensor)."""
    return isinstance(obj, (paddle.Tensor, _Shard))
