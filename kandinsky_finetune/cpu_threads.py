"""Each compute thread's share of the CPU cores for Paddle's kernels, set in OMP_NUM_THREADS before paddle is imported.

Paddle's CPU kernels use as many threads as OMP_NUM_THREADS says when paddle is first imported, and paddle sets
it to 1 when it is unset (later calls such as `paddle.base.core.set_num_threads` do not reach the kernels). So each
script calls share_cores() first, before anything imports paddle: the cores this process may run on, divided among
the processes that `paddle.distributed.launch` started on this machine and among the process's compute threads
(the prior scripts encode the next batch in a second thread, prefetch.py). A value the user set wins. Under the
launcher the inherited value may be the launcher's own paddle default rather than the user's: the launcher's
environment as it was started (/proc/<parent>/environ) tells which.
"""
import contextlib
import io
import os
import sys

PADDLE_WARNING = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")
decided = None  # (threads, why) once share_cores() has run, for the run's start-up line


def user_value(environ=os.environ, parent_environ=None):
    """The OMP_NUM_THREADS the user chose, or None."""
    value = environ.get("OMP_NUM_THREADS")
    if value is None or "PADDLE_LOCAL_RANK" not in environ:
        return value
    parent = parent_environ if parent_environ is not None else launcher_environ()
    if parent is None:  # cannot tell: take it as the user's
        return value
    return value if "OMP_NUM_THREADS" in parent else None


def launcher_environ():
    """The parent process's environment as it was started, or None where /proc cannot tell."""
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    return {e.split(b"=", 1)[0].decode(errors="replace") for e in entries if b"=" in e}


def cores_per_thread(compute_threads=1, environ=os.environ):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (max(1, int(environ.get("PADDLE_LOCAL_SIZE", "1"))) * compute_threads))


def share_cores(compute_threads=1):
    """Set OMP_NUM_THREADS for this process, which runs Paddle's kernels from `compute_threads` threads at once,
    then import paddle without its warning about a value above 1."""
    global decided
    if "paddle" in sys.modules:  # imported already (a test, a notebook): the kernels' thread count is fixed
        decided = (os.environ.get("OMP_NUM_THREADS", "1"), "paddle was imported first")
        return
    chosen = user_value()
    if chosen is not None:
        os.environ["OMP_NUM_THREADS"] = chosen
        decided = (chosen, "OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = str(cores_per_thread(compute_threads))
        decided = (os.environ["OMP_NUM_THREADS"], "cores / processes on this machine" + (
            f" / {compute_threads} compute threads per process" if compute_threads > 1 else ""))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import paddle  # noqa: F401
    finally:
        sys.stderr.write("".join(line for line in captured.getvalue().splitlines(keepends=True)
                                 if not line.startswith(PADDLE_WARNING)))
