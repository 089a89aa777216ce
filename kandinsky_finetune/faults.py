"""What a run does when something goes wrong: a stop request (SIGTERM, Ctrl-C), a non-finite loss, gradient
or weight, a failed write. Each ends the run with one line and its own exit status, and leaves nothing
non-finite or half-written where a resumed run or a user would load it.

    exit 0          trained to the end
    exit 1          RunError: training failed (diverged, a write failed, a collective failed); one `error:` line
    exit 2          UsageError: bad input, before training (params.py)
    exit 128 + N    stopped by signal N (143 SIGTERM, 130 Ctrl-C) after writing a checkpoint at the current step
"""
import math
import os
import signal
import threading
import time


class RunError(Exception):
    """A failure during the run, not a mistake in the input: one `error:` line, exit status 1."""


class Stopped(Exception):
    """A stop request was honoured (the checkpoint is written); the process exits with 128 + the signal number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------- stop requests
class StopRequest:
    """SIGTERM (a preempted job, the launcher stopping its workers) and SIGINT (Ctrl-C) only set a flag; the
    training loop reads it after each optimizer step, agrees on it with the other ranks, writes a checkpoint
    and stops. A Ctrl-C after that quits at once (KeyboardInterrupt). The launcher sends SIGTERM several times,
    so repeated SIGTERMs change nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        self._pid = os.getpid()

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a data-loader worker that got the signal before detach_worker ran
            return
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum:
            return
        self.signum = signum
        if os.environ.get("PADDLE_TRAINER_ID", "0") == "0":
            # os.write, not print: the handler may run while the main thread is inside a print to stderr
            again = " (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""
            os.write(2, f"\nreceived {signal.Signals(signum).name}: stopping after the current optimizer step "
                        f"with a checkpoint{again}\n".encode())


def detach_worker(worker_id, parent=None):
    """DataLoader worker start-up (`parent`: the main process's pid). Leave the main process's process group, so
    that a signal sent to the whole group (Ctrl-C in a terminal, paddle.distributed.launch stopping a worker)
    does not kill the workers the main process still needs to finish its step; it stops them itself. Die with
    the main process instead: an orphaned worker can block forever on a half-written queue message. Default
    SIGTERM and SIGINT again (the worker inherited the main process's handlers)."""
    try:
        os.setsid()
    except OSError:  # already a group leader: nothing to leave
        pass
    _die_with_parent(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _die_with_parent(parent):
    """Linux: the kernel sends this process SIGKILL when its parent exits, however it exits."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the worker's own parent check remains
        return
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


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


# ---------------------------------------------------------------- injected faults (tests only)
SLOW_ENV = "KANDINSKY_FAULT_SLOW"


def injected_delay(where):
    """Tests make work slow: KANDINSKY_FAULT_SLOW="checkpoint=10,validation=10,final_save=10" sleeps that many
    seconds at the start of each checkpoint, validation or final save (rank 0's solo work), "loading@1=40" on rank 1
    alone once it has loaded its models and data. Unset, it does nothing."""
    for item in filter(None, os.environ.get(SLOW_ENV, "").split(",")):
        name, _, seconds = item.partition("=")
        name, _, rank = name.strip().partition("@")
        if rank and rank != os.environ.get("PADDLE_TRAINER_ID", "0"):
            continue
        if name == where:
            os.write(2, f"{SLOW_ENV}: {where} sleeps {seconds} s\n".encode())  # tests wait for this line
            time.sleep(float(seconds))
