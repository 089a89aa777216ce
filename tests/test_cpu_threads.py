"""Each process gets its share of the CPU cores for Paddle's kernels (OMP_NUM_THREADS, set before paddle is
imported), alone and under paddle.distributed.launch; a value the user set wins, and Paddle's warning about a
value above 1 stays out of the output."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

from kandinsky_finetune import cpu_threads

CORES = len(os.sched_getaffinity(0))
SHOW = ("import sys; sys.path.insert(0, {root!r}); import os; from kandinsky_finetune import cpu_threads; "
        "cpu_threads.share_cores({compute_threads}); import paddle; "
        "print('threads', os.environ['OMP_NUM_THREADS'], cpu_threads.decided[1])")


def environment(**values):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PADDLE_LOCAL_RANK", "PADDLE_LOCAL_SIZE")}
    return {**env, **values}


def show(env, tmp_path, launch_processes=None, compute_threads=1):
    """What each process decided: [(threads, reason)], and everything it printed."""
    script = tmp_path / "show.py"
    script.write_text(SHOW.format(root=str(ROOT), compute_threads=compute_threads))
    cmd = [sys.executable, str(script)]
    if launch_processes:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(launch_processes),
               "--log_dir", str(tmp_path / "log"), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [proc.stdout + proc.stderr] if not launch_processes else [
        (tmp_path / "log" / f"workerlog.{i}").read_text() for i in range(launch_processes)]
    decided = [tuple(line.split(" ", 2)[1:]) for out in outputs for line in out.splitlines() if line.startswith("threads ")]
    return decided, "".join(outputs)


def test_one_process_takes_every_core(tmp_path):
    decided, output = show(environment(), tmp_path)
    assert decided == [(str(CORES), "cores / processes on this machine")]
    assert "OMP_NUM_THREADS set to" not in output  # Paddle's warning about a value above 1


def test_a_process_computing_in_two_threads_gives_each_its_share(tmp_path):
    decided, _ = show(environment(), tmp_path, compute_threads=2)
    assert decided == [(str(max(1, CORES // 2)), "cores / processes on this machine / 2 compute threads per process")]


@pytest.mark.parametrize("value", ["1", "3"])
def test_the_users_value_wins(tmp_path, value):
    decided, _ = show(environment(OMP_NUM_THREADS=value), tmp_path)
    assert decided == [(value, "OMP_NUM_THREADS")]


def test_launched_processes_share_the_cores(tmp_path):
    # the launcher imports paddle itself, which sets OMP_NUM_THREADS=1 in the environment its workers inherit
    decided, output = show(environment(), tmp_path, launch_processes=2)
    assert decided == [(str(max(1, CORES // 2)), "cores / processes on this machine")] * 2
    assert "OMP_NUM_THREADS set to" not in output


def test_a_launchers_inherited_value_is_told_from_the_users():
    launched = {"PADDLE_LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    assert cpu_threads.user_value(launched, parent_environ={"PATH"}) is None  # paddle set it in the launcher
    assert cpu_threads.user_value(launched, parent_environ={"PATH", "OMP_NUM_THREADS"}) == "1"
    assert cpu_threads.user_value({"OMP_NUM_THREADS": "4"}) == "4"  # not launched: the environment is the user's
    assert cpu_threads.user_value({}) is None
    assert cpu_threads.cores_per_thread(1, {"PADDLE_LOCAL_SIZE": str(CORES * 2)}) == 1  # never below one thread
