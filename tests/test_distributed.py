"""A 2-process launch (gloo on CPU) trains, syncs, and writes one output from rank 0; every rank ends cleanly. Two
launchers as two machines (over loopback) train alike; rank 0 working alone for longer than gloo's timeout kills
nobody, and a dead rank 0 still ends the other machine's launch at once."""
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, logged, model_args, run, state_dict_of
from kandinsky_finetune.faults import SLOW_ENV
from test_fault_runs import assert_same, checkpoints, launch, rank_pids, start, text_of, wait_for


@pytest.mark.parametrize("script,model,extra", [("train_text_to_image_prior.py", "prior", []),
                                                ("train_text_to_image_decoder.py", "unet", []),
                                                # each rank encodes its half of the 8 samples, both train from all 8
                                                ("train_text_to_image_prior_lora.py", None, ["--cache_encoder_outputs"]),
                                                ("train_text_to_image_decoder_lora.py", None, [])])
def test_two_process_launch(tiny, tmp_path, script, model, extra):
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(tmp_path / "log"), str(ROOT / script),
                *model_args(tiny, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2,
                            "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3, *extra,
                            "--cache_dir", tmp_path / "hf")],
               cwd=tmp_path, check=False)
    logs = {name: (tmp_path / "log" / name).read_text() for name in ("workerlog.0", "workerlog.1")}
    assert proc.returncode == 0, proc.stdout[-3000:] + logs["workerlog.0"][-3000:] + logs["workerlog.1"][-3000:]
    if "--cache_encoder_outputs" in extra:
        assert "encoder-output cache: encoded 4 samples here, 8 samples" in logs["workerlog.0"]
    assert "saved the" in logs["workerlog.0"] and "saved" not in logs["workerlog.1"]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert len(logged(out)) == 4  # one log, from rank 0, one value per optimizer step
    if model is None:  # LoRA: the LoRA file, trained away from its zero-initialised up-projections
        final = state_dict_of(out)
        assert any(np.abs(v).max() > 0 for k, v in final.items() if "lora.up" in k)
    else:
        final = state_dict_of(out / model)
        start = state_dict_of(os.path.join(tiny.prior if model == "prior" else tiny.decoder, model))
        assert any(not np.array_equal(final[k], start[k]) for k in final)
    assert all(np.isfinite(v).all() for v in final.values())


# ---------------------------------------------------------------- several machines; rank 0 working alone
SCRIPT = "train_text_to_image_prior_lora.py"
# 8 samples, 2 ranks, batches of 1: 4 steps per epoch, so a checkpoint at step 4, a validation after epoch 0, and
# the final save (with its validation) are each done by rank 0 alone
COMMON = ["--train_batch_size", 1, "--learning_rate", 1e-3, "--max_train_steps", 6, "--checkpointing_steps", 4,
          "--validation_prompt", "a cat", "--num_inference_steps", 2]


def node_launch(rank, port, log_dir, *args):
    """What each of two machines runs (here both on loopback): one worker each; --rank says which machine is rank 0
    (on real machines the one whose address is --master is)."""
    return [str(a) for a in (sys.executable, "-m", "paddle.distributed.launch", "--master", f"127.0.0.1:{port}",
                             "--nnodes", 2, "--rank", rank, "--host", "127.0.0.1", "--nproc_per_node", 1,
                             "--log_dir", log_dir, ROOT / SCRIPT, *args)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(tiny, folder, *args, env=None):
    """Both machines' launchers, each writing to its own output_dir (out0, out1) and --log_dir (log0, log1)."""
    port = free_port()
    return [start(node_launch(rank, port, folder / f"log{rank}", *model_args(tiny, folder / f"out{rank}", *args)),
                  folder / f"node{rank}.log", cwd=folder, env=env) for rank in (0, 1)]


@contextlib.contextmanager
def ended(launchers):
    """Whatever happens in the block, no launcher and no worker outlives it (each worker is in a session of its
    own, so it is killed by its own process group)."""
    try:
        yield launchers
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                for pid in [*rank_pids(launcher).values(), launcher.pid]:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                launcher.wait()


def worker_logs(*log_dirs):
    return [text_of(d / name) for d in log_dirs for name in sorted(os.listdir(d)) if name.startswith("workerlog.")]


@pytest.fixture(scope="module")
def apart_for_longer_than_gloos_timeout(tiny, tmp_path_factory):
    """The sharded launch of test_ranks_apart_for_longer_than_gloos_timeout_kill_nobody, started with the first test
    of this module that uses two_process_run: it mostly sleeps (over a minute), and the tests before it run meanwhile.
    (output folder, launcher)"""
    folder = tmp_path_factory.mktemp("apart")
    out = folder / "out"
    env = {SLOW_ENV: "loading@1=50,checkpoint=35"}
    with ended([start(launch(SCRIPT, folder / "log", *model_args(tiny, out, *COMMON, "--sharding", "stage1")),
                      folder / "launch.log", cwd=folder, env=env)]) as (launcher,):
        yield out, launcher


@pytest.fixture(scope="module")
def two_process_run(tiny, tmp_path_factory, apart_for_longer_than_gloos_timeout):
    """One 2-process launch on this machine: what the runs below must end equal to."""
    folder = tmp_path_factory.mktemp("two_process")
    run(launch(SCRIPT, folder / "log", *model_args(tiny, folder / "out", *COMMON)), cwd=folder, timeout=300)
    return folder / "out"


def test_two_launchers_as_two_machines_train_like_one_two_process_launch(tiny, tmp_path, two_process_run):
    with ended(start_nodes(tiny, tmp_path, *COMMON)) as nodes:
        codes = [node.wait(timeout=300) for node in nodes]
    logs = worker_logs(tmp_path / "log0", tmp_path / "log1")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    # rank 0's machine writes the output and the checkpoints; the other one nothing
    assert "saved the LoRA weights" in logs[0] and "saved" not in logs[1]
    assert checkpoints(tmp_path / "out0") == ["checkpoint-4"] and not (tmp_path / "out1").exists()
    assert_same(tmp_path / "out0", two_process_run, atol=0)


def test_a_dead_rank_0_ends_the_other_machine_at_once_while_it_works_alone(tiny, tmp_path):
    """rank 0 killed in the middle of a checkpoint: the other machine's launcher (which cannot see rank 0 die)
    ends within seconds, with one line saying what it was waiting for."""
    env = {SLOW_ENV: "checkpoint=600"}
    with ended(start_nodes(tiny, tmp_path, "--train_batch_size", 1, "--max_train_steps", 6,
                                   "--checkpointing_steps", 1, env=env)) as nodes:
        rank_0_log = tmp_path / "log0" / "workerlog.0"
        wait_for(lambda: rank_0_log.exists() and "checkpoint sleeps" in text_of(rank_0_log), nodes[0],
                 "rank 0's checkpoint", timeout=180)
        os.kill(rank_pids(nodes[0])[0], signal.SIGKILL)
        killed = time.time()
        code = nodes[1].wait(timeout=60)
        took = time.time() - killed
    rank_1_log = text_of(tmp_path / "log1" / "workerlog.0")
    assert code != 0 and took < 15, f"{took:.1f} s: {rank_1_log[-2000:]}"
    assert "error: rank 1: waiting while rank 0 is writing checkpoint-1 across 2 processes failed" in rank_1_log
    assert checkpoints(tmp_path / "out0") == []
    print(f"rank 1's launcher ended {took:.1f} s after rank 0 was killed")


def test_resuming_on_two_machines_where_one_does_not_see_the_checkpoint_is_an_error(tiny, tmp_path, two_process_run):
    """Each machine looks for --resume_from_checkpoint in its own output_dir: one that finds nothing would start over
    and train more steps than rank 0. Both stop with one line before training."""
    shutil.copytree(two_process_run, tmp_path / "out0")  # rank 0's machine has checkpoint-4, the other one nothing
    with ended(start_nodes(tiny, tmp_path, *COMMON, "--resume_from_checkpoint", "latest")) as nodes:
        codes = [node.wait(timeout=300) for node in nodes]
    logs = worker_logs(tmp_path / "log0", tmp_path / "log1")
    assert codes == [2, 2], "\n".join(log[-3000:] for log in logs)  # a usage error, on both machines
    for log in logs:
        assert "error: --resume_from_checkpoint latest: 1 of 2 processes do not find the checkpoint rank 0 resumes " \
               "from (checkpoint-4" in log and "Traceback" not in log, log[-2000:]
    assert "; rank 1 finds no checkpoint): every machine must see output_dir's checkpoints" in logs[1]
    assert "resumed" not in logs[0] and "steps:" not in logs[0]


def test_ranks_apart_for_longer_than_gloos_timeout_kill_nobody(apart_for_longer_than_gloos_timeout, two_process_run):
    """gloo fails a collective that waits more than 30 s (fixed in Paddle 3.3). Two ways ranks are apart that long,
    in one sharded run (each used to kill a rank, measured before the fixes):
    - rank 1 loads its models and data 50 s after rank 0 (minutes at real size, never at the same pace; 50 s leaves
      rank 0 waiting well over 30 s though its own loading is slow beside the tests running meanwhile): before
      distributed.wait_for_everyone, rank 0 stopped with a gloo TIMEOUT in the barrier;
    - rank 0 works alone on a checkpoint for 35 s (the sharded one, where every rank first sends its optimizer shard
      to rank 0 and then waits while rank 0 writes): before distributed.on_rank_0, rank 1 died 30 s in; and when
      rank 0 still wrote its own part of the state while rank 1 waited in the broadcast of its shard (the delay is
      injected at the start of everything rank 0 writes), rank 1 died 30 s in too.
    The final save waits on rank 0 the same way (on_rank_0). The launch started before this module's other tests
    (apart_for_longer_than_gloos_timeout); this test, the module's last, waits for it."""
    out, launcher = apart_for_longer_than_gloos_timeout
    code = launcher.wait(timeout=400)
    logs = worker_logs(out.parent / "log")
    assert code == 0, "\n".join(log[-3000:] for log in logs)
    assert re.findall(rf"{SLOW_ENV}: (\w+) sleeps", logs[0]) == ["checkpoint"]
    assert re.findall(rf"{SLOW_ENV}: (\w+) sleeps", logs[1]) == ["loading"]
    phases = dict(re.findall(r"(checkpointing) ([\d.]+) s", logs[0]))
    assert float(phases["checkpointing"]) >= 35, phases
    assert "saved the LoRA weights" in logs[0] and "saved" not in logs[1]
    assert checkpoints(out) == ["checkpoint-4"]
    assert_same(out, two_process_run, atol=1e-5)  # (sharded: the same weights as data parallel, within rounding)
