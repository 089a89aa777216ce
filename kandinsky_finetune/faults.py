"""What a run does when something goes wrong: a non-finite loss, gradient or weight, a failed write. Each ends
the run with one line and its own exit status, and leaves nothing non-finite or half-written where a resumed
run or a user would load it.

    exit 0          trained to the end
    exit 1          RunError: training failed (diverged, a write failed, a collective failed); one `error:` line
    exit 2          UsageError: bad input, before training (params.py)
"""
import math


class RunError(Exception):
    """A failure during the run, not a mistake in the input: one `error:` line, exit status 1."""


# ---------------------------------------------------------------- non-finite values
def all_finite(tensors):
    """True when every element of every tensor is finite (one device-to-host copy for all of them)."""
    import paddle

    checks = [paddle.isfinite(t).all() for t in tensors if t is not None]
    return bool(paddle.stack(checks).all().item()) if checks else True


def check_step(step, loss, grads_finite, loss_scaler):
    """Before optimizer step `step`: raise RunError on a non-finite loss, or on non-finite gradients without an
    fp16 loss scaler; with one, return the warning to log (the scaler skips the update and lowers the scale)."""
    if not math.isfinite(loss):
        raise RunError(f"step {step}: the loss is {loss}: training diverged; stopped before this optimizer step "
                       "and saved nothing from it (try a lower --learning_rate, or --max_grad_norm)")
    if grads_finite:
        return None
    if loss_scaler is None:
        raise RunError(f"step {step}: non-finite gradients (loss {loss:.4g}): training diverged; stopped before this "
                       "optimizer step and saved nothing from it (try a lower --learning_rate, or --max_grad_norm)")
    scale = float(loss_scaler.state_dict()["scale"].item())
    return (f"step {step}: non-finite gradients at fp16 loss scale {scale:g}: the loss scaler skips this update "
            "and lowers the scale")


# ---------------------------------------------------------------- write failures
def is_write_error(e):
    """An error from the file system (full disk, no permission, read-only): OSError, or the safetensors
    writer's own error type, which carries the OS error in its message."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
