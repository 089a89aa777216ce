"""The step plan: optimizer steps per epoch and in all, and which micro-batches accumulate into each step."""
import math


def plan_steps(batches_per_epoch, accumulation, num_train_epochs, max_train_steps):
    """(optimizer steps per epoch, total steps, epochs). An epoch's last, shorter accumulation group still
    makes an optimizer step, so no gradient is carried into the next epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if max_train_steps is None:
        max_train_steps = num_train_epochs * steps_per_epoch
    return steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def accumulation_groups(batches, num_batches, accumulation):
    """Yield (batch, group_size, is_last) so each micro-batch's loss can be divided by its group's real size
    and gradients synchronised on the last one only."""
    for i, batch in enumerate(batches):
        start = i - i % accumulation
        size = min(accumulation, num_batches - start)
        yield batch, size, i - start == size - 1
