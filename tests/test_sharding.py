"""--sharding: stage 1 on 2 CPU processes (gloo) trains the same weights as plain data parallelism, with gradient
accumulation and clipping that clips, while each rank holds about half of AdamW's state; its checkpoints hold the whole
optimizer state (gathered to rank 0), resume exactly after kill -9, and resume on one process; stages 2 and 3 on a CPU
are one error line (stage 3 runs on CPUs in test_sharding_stage3.py); the memory plan divides what a stage shards by the
number of processes."""
import contextlib
import os
import re
import shutil
import signal
import sys

import numpy as np
import pytest

from conftest import ROOT, model_args, run, run_script, state_dict_of
from test_fault_runs import children, start, text_of, wait_for
from kandinsky_finetune import memory_plan, params
from kandinsky_finetune.training_state import load_state

SCRIPT = "train_text_to_image_prior.py"
# 8 samples, 2 ranks x batch 2 x 2 micro-batches: one optimizer step per epoch. A max_grad_norm of 0.01 clips every
# step here (the test without clipping below shows it changes the weights)
COMMON = ["--max_train_steps", 12, "--checkpointing_steps", 2, "--train_batch_size", 2, "--gradient_accumulation_steps",
          2, "--learning_rate", 1e-3, "--lr_scheduler", "linear", "--lr_warmup_steps", 1]


def launch_command(tiny, out, logs, *extra, script=SCRIPT, common=COMMON, program=None):
    """`program`: what each process runs (default: the script)."""
    return [str(a) for a in (sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", 2, "--log_dir",
                             logs, *(program or [ROOT / script]), *model_args(tiny, out, *common, *extra))]


def launch(tiny, tmp_path, name, *extra, logs=None, **command):
    """A 2-process launch into tmp_path/name; (output folder, rank 0's log)."""
    out, logs = tmp_path / name, tmp_path / (logs or f"{name}-logs")
    proc = run(launch_command(tiny, out, logs, *extra, **command), cwd=tmp_path, check=False)
    log0 = (logs / "workerlog.0").read_text()
    assert proc.returncode == 0, log0[-3000:] + (logs / "workerlog.1").read_text()[-3000:]
    return out, log0


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    clip = ["--max_grad_norm", 0.01]
    return {"dp": launch(tiny, tmp, "dp", *clip), "tmp": tmp,
            "sharded": launch(tiny, tmp, "sharded", *clip, "--sharding", "stage1")}


def assert_same_weights(a, b, atol=1e-5):
    wa, wb = state_dict_of(a), state_dict_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=atol, err_msg=k)


def assert_same_optimizer_state(a, b, atol=1e-5):
    sa, sb = load_state(str(a))["optimizer"], load_state(str(b))["optimizer"]
    assert sa.keys() == sb.keys() and [k for k in sa if "moment" in k]
    for k in sa:
        if hasattr(sa[k], "numpy"):
            np.testing.assert_allclose(sa[k].numpy(), sb[k].numpy(), atol=atol, err_msg=k)
        else:
            assert sa[k] == sb[k], k


def test_stage1_trains_the_weights_of_data_parallel_and_checkpoints_the_whole_state(runs):
    (dp, _), (sharded, _) = runs["dp"], runs["sharded"]
    assert_same_weights(dp / "prior", sharded / "prior")
    for step in (2, 12):
        assert_same_weights(dp / f"checkpoint-{step}" / "prior", sharded / f"checkpoint-{step}" / "prior")
        # rank 0 wrote every rank's shard: the checkpoint is the unsharded run's, key for key
        assert_same_optimizer_state(dp / f"checkpoint-{step}", sharded / f"checkpoint-{step}")


def test_stage1_each_rank_holds_about_half_of_the_optimizer_state_as_planned(tiny, runs):
    (_, dp_log), (_, log) = runs["dp"], runs["sharded"]
    assert "optimizer state per process" not in dp_log
    # measured by each rank from its optimizer's own accumulators, after the first step
    shares = [(int(rank), float(mb), int(count)) for rank, mb, count in
              re.findall(r"rank (\d) ([\d.]+) MB in (\d+) tensors", log.split("optimizer state per process")[1])]
    assert [rank for rank, _, _ in shares] == [0, 1]
    total = sum(mb for _, mb, _ in shares)
    # the plan: AdamW's two fp32 moments per trained parameter (the beta powers are a few bytes), half per process
    planned = plan_items(tiny, 1)["optimizer states"] / 1e6, plan_items(tiny, 2, "--sharding", "stage1")
    assert total == pytest.approx(planned[0], rel=0.01)
    for _, mb, _ in shares:
        assert mb == pytest.approx(planned[1]["optimizer states"] / 1e6, rel=0.1), shares


def test_stage1_clipping_clips(tiny, runs):
    unclipped, _ = launch(tiny, runs["tmp"], "unclipped", "--max_grad_norm", 0, "--sharding", "stage1")
    a, b = state_dict_of(unclipped / "prior"), state_dict_of(runs["sharded"][0] / "prior")
    assert any(np.abs(a[k] - b[k]).max() > 1e-4 for k in a)


def test_kill_9_then_a_sharded_resume_matches_the_uninterrupted_run(tiny, runs):
    sharded, tmp = runs["sharded"][0], runs["tmp"]
    out, logs, flags = tmp / "killed", tmp / "killed-logs", ["--max_grad_norm", 0.01, "--sharding", "stage1"]
    launcher = start(launch_command(tiny, out, logs, *flags), tmp / "killed.log", cwd=tmp)
    worker0 = logs / "workerlog.0"
    wait_for(lambda: worker0.exists() and "saved " in text_of(worker0), launcher, "the first checkpoint")
    workers = children(launcher.pid)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and, in case they left its process group, its workers
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait()
    assert not (out / "model_index.json").exists(), "the run ended before the kill"
    _, log = launch(tiny, tmp, "killed", *flags, "--resume_from_checkpoint", "latest", logs="resumed-logs")
    assert re.search(r"resumed from \S+checkpoint-\d+ at step \d+", log), log[-2000:]
    assert_same_weights(sharded / "prior", out / "prior")
    assert_same_optimizer_state(sharded / "checkpoint-12", out / "checkpoint-12")


def test_a_two_process_sharded_checkpoint_resumes_on_one_process(tiny, runs):
    sharded, _ = runs["sharded"]
    out = runs["tmp"] / "one"
    out.mkdir()
    shutil.copytree(sharded / "checkpoint-2", out / "checkpoint-2")
    proc = run_script(SCRIPT, *model_args(tiny, out, *COMMON, "--max_grad_norm", 0.01, "--sharding", "stage1",
                                          "--resume_from_checkpoint", "latest"))
    assert "warning: --sharding stage1: one process, nothing to shard; training unsharded" in proc.stderr
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stderr
    assert "the checkpoint was written by 2 process(es), this run has 1: the optimizer state is whole" in proc.stderr
    # the whole optimizer state was restored and carried on (one process sees other batches: not the same weights)
    state = load_state(str(out / "checkpoint-12"))["optimizer"]
    assert state.keys() == load_state(str(sharded / "checkpoint-12"))["optimizer"].keys()


def test_a_resume_maps_the_optimizer_state_instead_of_reading_it(runs):
    """A run loads a checkpoint's optimizer tensors as memory maps of the file, with the same values: each rank's
    sharding optimizer reads the part it takes, when it takes it."""
    checkpoint = str(runs["sharded"][0] / "checkpoint-2")
    mapped, read = load_state(checkpoint, mapped_optimizer=True)["optimizer"], load_state(checkpoint)["optimizer"]
    assert mapped.keys() == read.keys()
    tensors = [k for k, v in read.items() if hasattr(v, "numpy")]
    assert tensors and all(isinstance(mapped[k], np.memmap) for k in tensors)
    for k in tensors:
        np.testing.assert_array_equal(np.asarray(mapped[k]), read[k].numpy())


@pytest.mark.parametrize("stage,what", [("stage2", "gradients"), ("stage3", "gradients and parameters")])
def test_stages_2_and_3_on_a_cpu_are_one_error_line_before_anything_loads(tiny, tmp_path, stage, what):
    out = tmp_path / "out"
    proc = run_script(SCRIPT, *model_args(tiny, out, "--sharding", stage), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --sharding {stage}: Paddle shards {what} on GPUs only (group_sharded_parallel); on cpu use "
        "--sharding stage1 (optimizer states)")
    assert "Traceback" not in proc.stderr and "memory plan" not in proc.stderr and not out.exists()


def plan_args_of(tiny, *extra):
    parser = params.build_parser("test")
    params.add_prior_args(parser)
    return params.parse(parser, model_args(tiny, "unused", "--print_memory_plan", "gpu", *extra))


def plan_items(tiny, processes, *extra):
    plan = memory_plan.build(plan_args_of(tiny, *extra), "prior", False, "gpu", processes)
    return {label: size for label, size, _ in plan.phases["training"]}


@pytest.mark.parametrize("stage,divided", [("stage1", {"optimizer states"}),
                                           ("stage2", {"optimizer states", "gradients"}),
                                           ("stage3", {"optimizer states", "gradients", "trained weights"})])
def test_the_plan_divides_what_the_stage_shards(tiny, stage, divided, monkeypatch):
    monkeypatch.setattr(memory_plan, "SLICED_ABOVE", 0)  # stage 3 slices every parameter (see the next test)
    whole = plan_items(tiny, 1, "--sharding", stage)
    assert whole == plan_items(tiny, 4)  # on one process nothing is sharded
    quarter = plan_items(tiny, 4, "--sharding", stage)
    for label, size in whole.items():
        assert quarter[label] == (size // 4 if label in divided else size), label
    assert set(quarter) - set(whole) == ({"gathered layers"} if stage == "stage3" else set())


def test_the_plan_of_stage3_divides_the_large_parameters_only(tiny, monkeypatch):
    """Paddle's stage 3 slices parameters of more than 2**20 elements (segment_size) and keeps the others whole."""
    whole, quarter = plan_items(tiny, 1), plan_items(tiny, 4, "--sharding", "stage3")
    assert quarter["trained weights"] == whole["trained weights"]  # the tiny prior's are all small
    monkeypatch.setattr(memory_plan, "SLICED_ABOVE", 1024)
    quarter = plan_items(tiny, 4, "--sharding", "stage3")
    assert whole["trained weights"] // 4 < quarter["trained weights"] < whole["trained weights"]


def test_print_memory_plan_takes_the_process_count_from_the_launcher_variable(tiny):
    proc = run_script(SCRIPT, *model_args(tiny, "unused", "--print_memory_plan", "gpu", "--sharding", "stage1"),
                      env={"PADDLE_TRAINERS_NUM": "8"})
    assert "one of 8 processes, --sharding stage1" in proc.stderr
    assert re.search(r"optimizer states .*; 1/8 of [\d.]+ GB \(--sharding stage1\)", proc.stderr), proc.stderr


def test_on_a_gpu_too_small_the_plan_names_the_sharding_stage_that_fits(tiny, monkeypatch):
    import paddle

    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:0")  # the plan's GPU branch, on any machine

    def peak(*extra):
        return memory_plan.build(plan_args_of(tiny, *extra), "prior", False, "gpu", 2).peak

    cached = ["--cache_encoder_outputs"]
    assert peak(*cached) > peak(*cached, "--sharding", "stage1") > peak(*cached, "--sharding", "stage2")
    for stage in "stage1", "stage2":
        capacity = peak(*cached, "--sharding", stage)
        assert memory_plan.fitting_flags(plan_args_of(tiny, *cached), "prior", False, capacity, 2).startswith(
            f"it would fit with --sharding {stage} (")
    # one process: nothing to shard, so sharding is never named
    assert "--sharding" not in memory_plan.fitting_flags(plan_args_of(tiny, *cached), "prior", False, 0, 1)


@pytest.mark.parametrize("script,saved", [("train_text_to_image_decoder.py", "unet"),  # the whole UNet, with EMA
                                          ("train_text_to_image_decoder_lora.py", "")])  # its LoRA layers
def test_the_other_scripts_shard_too(tiny, tmp_path, script, saved):
    out, logs = tmp_path / "out", tmp_path / "logs"
    extra = ["--use_ema"] if saved else []
    common = ["--max_train_steps", 2, "--checkpointing_steps", 2, "--train_batch_size", 2]
    proc = run(launch_command(tiny, out, logs, "--sharding", "stage1", *extra, script=script, common=common),
               cwd=tmp_path, check=False)
    log = (logs / "workerlog.0").read_text()
    assert proc.returncode == 0, log[-3000:] + (logs / "workerlog.1").read_text()[-3000:]
    trained = len(state_dict_of(out / saved))  # the trained tensors, as saved
    counts = [int(n) for n in re.findall(r"rank \d [\d.]+ MB in (\d+) tensors", log)]
    assert len(counts) == 2 and sum(counts) == 4 * trained  # two moments and two beta powers per trained tensor
    assert all(count < 3 * trained for count in counts)  # split, not copied
    state = load_state(str(out / "checkpoint-2"))
    assert len([k for k in state["optimizer"] if "moment" in k]) == 2 * trained  # every rank's, in rank 0's checkpoint
    assert (state["ema"] is not None) == bool(extra)


def test_the_cpu_plan_of_a_sharded_checkpoint_counts_the_shards_rank_0_receives(tiny):
    """Rank 0 receives the other ranks' optimizer shards before it writes (no rank waits in a collective while it
    writes): on a CPU, that is memory of its process for the while."""
    def checkpoint_items(device, processes, *extra):
        plan = memory_plan.build(plan_args_of(tiny, *extra), "prior", False, device, processes)
        return {label: size for label, size, _ in plan.phases["checkpoint"]}

    whole = checkpoint_items("cpu", 1)["optimizer states"]
    sharded = checkpoint_items("cpu", 2, "--sharding", "stage1")
    assert sharded["optimizer states"] + sharded["other ranks' optimizer states"] == whole
    assert "other ranks' optimizer states" not in checkpoint_items("gpu", 2, "--sharding", "stage1")  # (host memory)
