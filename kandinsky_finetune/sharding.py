"""--sharding: the training state split across the processes of a launch, on Paddle's own engines (stage 1: fleet's
sharding optimizer, CPU and GPU; stages 2 and 3: group_sharded_parallel, GPU only), and gathered whole for checkpoints
(sharded_checkpoint.py).

Stage 3 keeps only a slice of each large parameter on each rank (GroupShardedStage3: the parameter flattened, padded,
cut in equal parts; a layer's forward and backward gather it whole for the while). What needs whole weights gets them
from `whole_parameters`, on every rank together: a checkpoint and the final save (which rank 0 then writes alone), and
loading a checkpoint's weights (written back into the slices). Validation runs on every rank together instead of on
rank 0 alone: the trained model's layers gather their slices, a collective.
"""
import contextlib

import paddle

from .params import UsageError
from .sharded_checkpoint import Shard

LEVELS = {"stage2": "os_g", "stage3": "p_g_os"}  # group_sharded_parallel's levels
GPU_ONLY = set(LEVELS)  # Paddle asserts a GPU, XPU or custom device for them
SHARDS = {"stage2": "gradients", "stage3": "gradients and parameters"}


def check(args, ctx, log):
    """Before anything loads: a stage this device cannot run is one line; on one process there is nothing to shard
    (the run says so and trains unsharded)."""
    stage = args.sharding
    if stage is None:
        return
    if stage in GPU_ONLY and "gpu" not in ctx.device:
        raise UsageError(f"--sharding {stage}: Paddle shards {SHARDS[stage]} on GPUs only (group_sharded_parallel); on "
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

    # Stage 3 hooks every layer that has parameters of its own, and its hook takes only tensors as the layer's output:
    # the top model (the prior has a few parameters of its own) returns a ModelOutput, so it stays whole and unhooked
    stage3 = {"exclude_layer": [id(model)]} if args.sharding == "stage3" else {}
    model, optimizer, scaler = group_sharded_parallel(model, optimizer, LEVELS[args.sharding],
                                                      scaler=precision.scaler, **stage3)
    precision.scaler = scaler  # (GroupShardedScaler around an fp16 loss scaler, or None)
    # Stages 2 and 3 keep the gradients in buffers of their own and replace clear_grad with one that takes no
    # argument; the loop's clear_grad(set_to_zero=False) reaches it through this
    clear = optimizer.clear_grad
    optimizer.clear_grad = lambda set_to_zero=True: clear()
    restore = optimizer.set_state_dict
    if args.sharding == "stage3":  # the optimizer works on slices of the parameters: a state of whole ones is cut
        optimizer.parameter_slices = slices = ParameterSlices(model)
        optimizer.set_state_dict = lambda state: restore(slices.cut(state))
        return model, optimizer
    # stage 2's set_state_dict hands the whole state to AdamW, which would keep every rank's part: keep this rank's
    own = {name for name, rank in optimizer.param2rank.items() if rank == optimizer._rank}
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
        inner = getattr(optimizer, "_inner_opt", None) or optimizer._optim
        if inner is optimizer:  # stage 3 marks the AdamW itself as its own _optim
            break
        optimizer = inner
    return optimizer


def accumulators(optimizer):
    """(tensor count, bytes) of the optimizer state this rank holds, read from the optimizer's own tables (the moments
    and beta powers Paddle created on this rank)."""
    tensors = [t for table in innermost(optimizer)._accumulators.values() for t in table.values()]
    return len(tensors), sum(t.size * t.element_size() for t in tensors)


def log_shares(optimizer, log, model, trainable):
    """After the first step (when Paddle has created the optimizer state): one line with each rank's part of it, and
    with stage 3 of the `trainable` weights of `model` (local_weights). Collective."""
    import paddle.distributed as dist

    shares = []
    weights = local_weights(model, trainable) if is_stage3(model) else []
    dist.all_gather_object(shares, (*accumulators(optimizer), sum(t.size * t.element_size() for t in weights)))
    log("optimizer state per process (--sharding): " + ", ".join(
        f"rank {rank} {size / 1e6:.3f} MB in {count} tensors" + (f" (trained weights {held / 1e6:.3f} MB)"
                                                                 if weights else "")
        for rank, (count, size, held) in enumerate(shares)))


# ---------------------------------------------------------------- stage 3: parameters in slices
def is_stage3(model):
    return hasattr(model, "_param2buffer")  # GroupShardedStage3's table of where each rank's slice lies


class ParameterSlices:
    """Where GroupShardedStage3 keeps this rank's part of each sliced parameter: the parameter flattened, padded to
    its buffer size, and cut in one equal range per rank (`_param2buffer`). The optimizer's state of a sliced
    parameter is named `slice@<name>_<accumulator>_0` and its moments have the slice's shape; a checkpoint holds
    them whole, as unsharded training names and shapes them."""

    PREFIX = "slice@"

    def __init__(self, model):
        self.rank, self.group = model._rank, model._group
        self.ranges, self.buffer_sizes = model._param2buffer, model._param2buffer_size
        self.shapes = {p.name: list(p.shape) for p in model._layer.parameters() if p.name in self.ranges}

    def _parameter(self, key):
        """The sliced parameter that an optimizer state key `<name>_<accumulator>_0` belongs to, or None."""
        names = [name for name in self.shapes if key.startswith(f"{name}_")]
        return max(names, key=len) if names else None

    def _is_moment(self, name, shape, whole):
        """A moment has the parameter's shape (whole) or its slice's; a beta power is one number."""
        start, end = self.ranges[name][self.rank]
        return list(shape) == (self.shapes[name] if whole else [end - start])

    def cut(self, state):
        """A whole optimizer state (a checkpoint's) as this rank's optimizer names and holds it."""
        out = {}
        for key, value in state.items():
            name = self._parameter(key) if isinstance(key, str) else None
            if name is None:
                out[key] = value
                continue
            if self._is_moment(name, value.shape, whole=True):
                value = _slice_of(value.numpy() if isinstance(value, paddle.Tensor) else value,
                                  self.buffer_sizes[name], self.ranges[name][self.rank])
            out[self.PREFIX + key] = value  # (a beta power: the same on every rank)
        return out

    def joined(self, local):
        """This rank's optimizer state with the slices' names and shapes made whole again, each sliced moment a
        _Joined (gathered from every rank when it is written): collective, like gathered_state."""
        out = {}
        for key, value in local.items():
            name = self._parameter(key[len(self.PREFIX):]) if key.startswith(self.PREFIX) else None
            if name is None:
                out[key] = value
                continue
            key = key[len(self.PREFIX):]
            out[key] = _Joined(value, self.shapes[name], str(value.dtype), self.group) if self._is_moment(
                name, value.shape, whole=False) else value
        return out


class _Joined(Shard):
    """A moment of a stage-3 slice, as write_safetensors sees it: the parameter's shape; its values all-gathered from
    every rank's slice when rank 0 writes it (every rank joins, in the same order: take_part)."""

    def __init__(self, local, shape, dtype, group):
        super().__init__(local, shape, dtype, owner=None)
        self.group = group

    def fetch(self):
        import paddle.distributed as dist

        parts = []
        dist.all_gather(parts, self.local, group=self.group)
        return paddle.concat(parts)[:self.size].reshape(self.shape)


def _slice_of(whole, buffer_size, rank_range):
    """A rank's slice of a parameter's values (numpy), as GroupShardedStage3 cuts them: flattened, padded with zeros
    to the buffer size, this rank's (start, end)."""
    import numpy as np

    flat = np.asarray(whole).reshape(-1)
    flat = np.concatenate([flat, np.zeros(buffer_size - flat.size, flat.dtype)])
    start, end = rank_range
    return np.ascontiguousarray(flat[start:end])


def _is_sliced(p):
    """A parameter stage 3 holds as this rank's slice just now (not kept whole, not gathered for a layer)."""
    return getattr(p, "fw_storage", None) is not None and getattr(p, "status", "") == "part"


def _sliced(model):
    """The trained parameters stage 3 holds in slices (frozen ones, a LoRA run's base model, are never saved), in the
    same order on every rank."""
    return [p for p in model._layer.parameters() if not p.stop_gradient and _is_sliced(p)]


@contextlib.contextmanager
def whole_parameters(model):
    """Stage 3: rank 0's trained parameters whole, in host memory, for the while (each all-gathered from every rank's
    slice on the device, one at a time: a collective, so every rank enters together); the other ranks hold their
    slices only. Afterwards rank 0 holds its slices alone again. Any other model: nothing to do."""
    if not is_stage3(model):
        yield
        return
    import paddle.distributed as dist

    gathered = []
    with paddle.no_grad():
        for p in _sliced(model):
            parts = []
            dist.all_gather(parts, p.fw_storage, group=model._group)
            if model._rank == 0:
                paddle.concat(parts)[:p._numel()].cpu()._share_buffer_to(p)
                gathered.append(p)
            del parts
    try:
        yield
    finally:
        for p in gathered:
            p._clear_data()


def loads_into_slices(model, load_weights):
    """`load_weights(folder)` for a stage-3 model: every rank reads the whole trained weights into host memory (the
    loader fills parameters by name, so all are whole for the while) and keeps its slice of each."""
    import numpy as np

    def load(folder):
        sliced = _sliced(model)
        for p in sliced:
            paddle.to_tensor(np.zeros(p.shape, "float32"), dtype=p.dtype, place=paddle.CPUPlace())._share_buffer_to(p)
        try:
            load_weights(folder)
            for p in sliced:
                p.fw_storage.set_value(_slice_of(p.numpy(), model._param2buffer_size[p.name],
                                                 model._param2buffer[p.name][model._rank]))
        finally:
            for p in sliced:
                p._clear_data()

    return load


def local_weights(model, parameters):
    """What this rank holds of `parameters`: with stage 3 a sliced parameter's slice, a whole one as it is."""
    if not is_stage3(model):
        return list(parameters)
    return [p.fw_storage if _is_sliced(p) else p for p in parameters]


def local_gradients(model, parameters):
    """The gradients this rank holds of `parameters` before the optimizer step: with stage 3 a sliced parameter's
    (already reduced over the ranks) is in its `bw_storage`, a whole one's in .grad as usual."""
    if not is_stage3(model):
        return [p.grad for p in parameters]
    return [p.bw_storage if hasattr(p, "bw_storage") else p.grad for p in parameters]
