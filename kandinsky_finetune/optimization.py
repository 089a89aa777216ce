"""The optimizer step's parts: AdamW and its learning-rate schedule, clipping by global norm, and the finite-gradient
check, which reads the clipping's one norm instead of every gradient once more."""
import math

import paddle
from paddle import _C_ops

from .steps import plan_steps


def build_optimizer(parameters, args, sampler):
    """(optimizer, lr_scheduler). Clipping is not the optimizer's (see clip_gradients), but with --sharding: the
    gradients are reduced inside the sharded step, and Paddle makes the optimizer's clip use the norm over all
    shards."""
    from ppdiffusers.optimization import get_scheduler

    max_train_steps = plan_steps(sampler.batches_per_epoch, args.gradient_accumulation_steps, args.num_train_epochs,
                                 args.max_train_steps)[1]
    # The schedule counts optimizer steps, the unit of --lr_warmup_steps and --max_train_steps.
    lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate=args.learning_rate,
                                 num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps)
    sharded_clip = getattr(args, "sharding", None) and args.max_grad_norm > 0
    grad_clip = paddle.nn.ClipGradByGlobalNorm(args.max_grad_norm) if sharded_clip else None
    optimizer = paddle.optimizer.AdamW(learning_rate=lr_scheduler, parameters=parameters, beta1=args.adam_beta1,
                                       beta2=args.adam_beta2, epsilon=args.adam_epsilon,
                                       weight_decay=args.adam_weight_decay, grad_clip=grad_clip)
    return optimizer, lr_scheduler


@paddle.no_grad()
def clip_gradients(grads, max_norm):
    """Scale `grads` in place so their global L2 norm is at most `max_norm`; return whether they are all finite.

    The arithmetic is that of paddle.nn.ClipGradByGlobalNorm (the same kernels in the same order, so the weights
    come out bit-identical), with two savings: a norm within `max_norm` leaves the gradients untouched instead of
    multiplying them by exactly 1, and scaled gradients are written in place instead of into new tensors (a
    second copy of every gradient at real size). A non-finite gradient makes the norm non-finite, so its one
    number, read once, is the finite check: nothing else reads the gradients again."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return True
    # The per-tensor Python around each kernel is most of the cost on small models (and a GPU's launch gaps): the
    # dtypes are read once, and the in-place multiply is called without the API's shape check (a [1] scale broadcasts)
    dtypes = {g.dtype for g in grads}
    squares = [_C_ops.squared_l2_norm(g) for g in grads]  # the kernel ClipGradByGlobalNorm uses
    if dtypes != {paddle.float32}:
        squares = [s if s.dtype == paddle.float32 else s.astype("float32") for s in squares]
    norm = paddle.sqrt(paddle.stack([paddle.stack(squares).sum()]).sum())
    value = float(norm.item())
    if not math.isfinite(value):
        return False
    if value > max_norm:
        limit = paddle.full([1], max_norm, dtype="float32")
        scale = paddle.divide(limit, paddle.maximum(norm, limit))
        scales = {dtype: scale if dtype == paddle.float32 else scale.astype(dtype) for dtype in dtypes}
        if len(scales) == 1:
            (scale,) = scales.values()
        for g in grads:
            _C_ops.multiply_(g, scale if len(scales) == 1 else scales[g.dtype])
    return True


def release_optimizer_state(optimizer):
    """Free the optimizer's moments (8 bytes per trained parameter in AdamW) once no step and no checkpoint needs
    them. Paddle has no public call for it: its accumulators are dropped from the optimizer's own tables (those of
    the AdamW inside a sharding wrapper)."""
    from .sharding import innermost

    optimizer = innermost(optimizer)
    for table in ("_accumulators", "_master_weights", "_accumulators_holder"):
        if isinstance(getattr(optimizer, table, None), dict):
            getattr(optimizer, table).clear()
    import gc

    gc.collect()
