"""The real scripts under faults: a diverging loss, kill -9 at random moments, SIGTERM (one process and a
2-process launch), a rank that dies. Runs are tiny and shared where they can be."""
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import GIVEN_ENVIRONMENT, ROOT, logged, model_args, run, run_script, state_dict_of


def saved_tensors(folder):
    """Every weights file under `folder` (checkpoints and final save), as {path: {name: array}}."""
    from safetensors.numpy import load_file

    return {f: load_file(f) for f in glob.glob(os.path.join(str(folder), "**", "*.safetensors"), recursive=True)}


def test_divergence_stops_with_one_line_and_saves_nothing_non_finite(tiny, tmp_path):
    out = tmp_path / "out"
    # A learning rate of 1e20 (no clipping) makes step 1's weights huge, so step 2's loss is nan
    proc = run_script("train_text_to_image_decoder.py", *model_args(
        tiny, out, "--max_train_steps", 6, "--checkpointing_steps", 1, "--train_batch_size", 2, "--learning_rate", 1e20,
        "--max_grad_norm", 0, "--lr_warmup_steps", 0), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: step (\d+): the loss is nan: training diverged; stopped before this optimizer step "
                        r"and saved nothing from it \(try a lower --learning_rate, or --max_grad_norm\)", last), last
    step = int(re.search(r"step (\d+)", last).group(1))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [
        f"checkpoint-{k}" for k in range(1, step)]
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    tensors = saved_tensors(out)
    assert tensors and all(np.isfinite(v).all() for weights in tensors.values() for v in weights.values())


# ---------------------------------------------------------------- kill -9 and SIGTERM: exact resume
PRIOR = "train_text_to_image_prior.py"
STEPS = 10
# 8 samples, batches of 2, 2 micro-batches per step: 2 steps per epoch, so odd steps end mid-epoch; EMA and a
# data-loader worker process are part of what must resume exactly
COMMON = ["--train_batch_size", 2, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3, "--lr_scheduler",
          "linear", "--lr_warmup_steps", 2, "--max_train_steps", STEPS, "--use_ema", "--dataloader_num_workers", 1]


def start(cmd, log, cwd=ROOT, env=None):
    """Start `cmd` in its own session, stdout and stderr to the file `log` (a pipe would wait for data-loader
    workers that outlive a killed process)."""
    with open(log, "w") as f:
        return subprocess.Popen(list(map(str, cmd)), cwd=str(cwd), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**GIVEN_ENVIRONMENT, **(env or {})})


def wait_for(condition, proc, what, timeout=120):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def text_of(log):
    return log.read_text(errors="replace").replace("\r", "\n")


def children(pid):
    """The pids of `pid`'s child processes."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                found.append(int(entry))
        except (OSError, IndexError):
            pass
    return found


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, what, timeout=10):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def checkpoints(out):
    return sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def assert_same(a, b, atol=1e-5):
    wa, wb = state_dict_of(a), state_dict_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "out"
    # a new interpreter, as the runs it is compared with (started here to be killed) and their resumes: the same
    # kernel threads, so the same sums
    run_script(PRIOR, *model_args(tiny, out, *COMMON, "--checkpointing_steps", 1000), new_interpreter=True)
    return out


def test_kill_9_at_random_moments_then_resume_latest(tiny, tmp_path, reference):
    """Three kills (the same run resumed each time, as a job preempted again and again), each while a seeded
    step's checkpoint is being written or just after; then a resume to the end."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-u", ROOT / PRIOR, *model_args(
        tiny, out, *COMMON, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--resume_from_checkpoint",
        "latest")]
    rng = random.Random(2024)
    targets = sorted(rng.sample(range(1, STEPS), 3))
    partial_left = []
    for trial, target in enumerate(targets):
        log = tmp_path / f"trial{trial}.log"
        proc = start(cmd, log)
        started = lambda: os.path.isdir(out) and any(  # noqa: E731
            n in (f"checkpoint-{target}", f".tmp-checkpoint-{target}") for n in os.listdir(out))
        wait_for(started, proc, f"checkpoint {target}")
        time.sleep(rng.uniform(0, 0.03))
        workers = children(proc.pid)
        proc.kill()
        proc.wait()
        wait_until(lambda: not any(alive(pid) for pid in workers), "the data-loader worker to die with its parent")
        text = text_of(log)
        assert ("resumed from" in text) == (trial > 0), text[-2000:]
        if trial == 0:  # the log on disk has every step to the checkpoint being written (Loop._checkpoint)
            assert len(logged(out)) >= target
        assert len(re.findall("warning: removing", text)) == len(partial_left)
        partial_left = [n for n in os.listdir(out) if n.startswith(".tmp-")]
        print(f"killed while writing checkpoint {target}: left {checkpoints(out)} and {partial_left}")
    proc = run([str(a) for a in cmd])
    assert "resumed from" in proc.stderr
    assert len(re.findall("warning: removing", proc.stderr)) == len(partial_left)
    assert checkpoints(out) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert_same(out / "prior", reference / "prior")  # the EMA weights, the saved model


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_writes_a_checkpoint_at_the_current_step_then_resume_is_exact(tiny, tmp_path, reference, sig):
    out = tmp_path / "out"
    args = model_args(tiny, out, *COMMON, "--checkpointing_steps", 1000)
    log = tmp_path / "run.log"
    proc = start([sys.executable, "-u", ROOT / PRIOR, *args], log)
    wait_for(lambda: "samples," in text_of(log), proc, "the training loop")  # signals are handled from here on
    # to the whole process group, as Ctrl-C in a terminal does: the data-loader worker must survive it
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=60) == 128 + sig
    text = text_of(log)
    assert "Traceback" not in text
    m = re.search(rf"stopped by {sig.name} after step (\d+): saved (\S+); continue with --resume_from_checkpoint "
                  "latest", text)
    assert m, text[-2000:]
    step = int(m.group(1))
    assert m.group(2) == str(out / f"checkpoint-{step}") and checkpoints(out) == [f"checkpoint-{step}"]
    assert step < STEPS and not (out / "model_index.json").exists()
    proc = run_script(PRIOR, *args, "--resume_from_checkpoint", "latest", new_interpreter=True)
    assert f"at step {step}" in proc.stderr
    assert_same(out / "prior", reference / "prior")


# ---------------------------------------------------------------- 2-process launches
def launch(script, log_dir, *args):
    return [str(a) for a in (sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", 2, "--log_dir",
                             log_dir, ROOT / script, *args)]


def rank_pids(launcher):
    """{rank: pid} of the launcher's worker processes."""
    pids = {}
    for pid in children(launcher.pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"PADDLE_TRAINER_ID=")]
        if rank:
            pids[int(rank[0])] = pid
    return pids


def test_sigterm_to_a_two_process_launch(tiny, tmp_path):
    """The launcher forwards SIGTERM to both workers; they stop at the same step, rank 0 writes one checkpoint,
    both exit long before the launcher's 30 s kill, and a resumed launch ends equal to an uninterrupted one."""
    script = "train_text_to_image_prior_lora.py"
    common = ["--train_batch_size", 1, "--learning_rate", 1e-3, "--max_train_steps", 8, "--checkpointing_steps", 1000]
    run(launch(script, tmp_path / "log_ref", *model_args(tiny, tmp_path / "ref", *common)), cwd=tmp_path)
    out = tmp_path / "out"
    launcher = start(launch(script, tmp_path / "log", *model_args(tiny, out, *common)), tmp_path / "launch.log",
                     cwd=tmp_path)
    worker0 = tmp_path / "log" / "workerlog.0"
    wait_for(lambda: worker0.exists() and "samples," in text_of(worker0), launcher, "the training loop")
    sent = time.time()
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    assert time.time() - sent < 20, "the workers did not stop by themselves"
    logs = [text_of(tmp_path / "log" / f"workerlog.{rank}") for rank in (0, 1)]
    assert "Traceback" not in logs[0] + logs[1]
    m = re.search(r"stopped by SIGTERM after step (\d+): saved (\S+);", logs[0])
    assert m, logs[0][-2000:]
    step = int(m.group(1))
    assert checkpoints(out) == [f"checkpoint-{step}"] and "saved" not in logs[1]
    proc = run(launch(script, tmp_path / "log_resumed", *model_args(
        tiny, out, *common, "--resume_from_checkpoint", "latest")), cwd=tmp_path, check=False)
    resumed = text_of(tmp_path / "log_resumed" / "workerlog.0")
    assert proc.returncode == 0 and f"at step {step}" in resumed, resumed[-2000:]
    assert_same(out, tmp_path / "ref")


def test_a_dead_rank_ends_the_launch_quickly(tiny, tmp_path):
    """kill -9 of rank 1 mid-training: rank 0 does not hang; the launch fails within seconds, saving nothing."""
    out = tmp_path / "out"
    launcher = start(launch(PRIOR, tmp_path / "log", *model_args(
        tiny, out, "--train_batch_size", 1, "--max_train_steps", 100000, "--checkpointing_steps", 100000)),
        tmp_path / "launch.log", cwd=tmp_path)
    worker0 = tmp_path / "log" / "workerlog.0"
    try:
        wait_for(lambda: worker0.exists() and "samples," in text_of(worker0), launcher, "the training loop")
        time.sleep(0.5)
        pids = rank_pids(launcher)
        killed = time.time()
        os.kill(pids[1], signal.SIGKILL)
        returncode = launcher.wait(timeout=60)
        took = time.time() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
            for pid in rank_pids(launcher).values():
                os.kill(pid, signal.SIGKILL)
    assert returncode != 0
    assert took < 15, f"rank 0 took {took:.1f} s to end"
    assert not alive(pids[0])
    assert not (out / "model_index.json").exists() and checkpoints(out) == []
    print(f"rank 0 ended {took:.1f} s after rank 1 was killed; its log ends: {text_of(worker0).strip()[-300:]}")
