"""Fault handling inside one process: the divergence check, stop requests, atomic checkpoints and final
saves, and a failing disk, which must end the run with one line and leave the last checkpoint intact."""
import errno
import json
import os
import signal

import numpy as np
import pytest

import train_text_to_image_prior
import train_text_to_image_prior_lora
from conftest import model_args
from kandinsky_finetune import checkpoint, checkpoint_files, faults, lora, training_state
from kandinsky_finetune.params import UsageError


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, message):
        self.lines.append(message)

    def warn(self, message):
        self.lines.append(f"warning: {message}")


# ---------------------------------------------------------------- divergence
class FakeScaler:
    def state_dict(self):
        return {"scale": np.array([32768.0], dtype="float32")}


def test_non_finite_loss_or_gradient_stops_naming_the_step():
    assert faults.check_step(7, 0.5, True, None) is None
    with pytest.raises(faults.RunError, match=r"^step 7: the loss is nan: training diverged"):
        faults.check_step(7, float("nan"), True, None)
    with pytest.raises(faults.RunError, match=r"^step 8: non-finite gradients .*training diverged"):
        faults.check_step(8, 0.5, False, None)
    with pytest.raises(faults.RunError, match="the loss is inf"):  # a loss scaler does not excuse the loss itself
        faults.check_step(9, float("inf"), True, FakeScaler())


def test_fp16_loss_scaler_skips_a_step_with_non_finite_gradients():
    warning = faults.check_step(9, 0.5, False, FakeScaler())
    assert warning == ("step 9: non-finite gradients at fp16 loss scale 32768: the loss scaler skips this update "
                       "and lowers the scale")


def test_all_finite():
    import paddle

    assert faults.all_finite([paddle.ones([3]), None, paddle.zeros([2, 2])])
    assert not faults.all_finite([paddle.ones([3]), paddle.to_tensor([1.0, float("inf")])])
    assert not faults.all_finite([paddle.to_tensor([float("nan")])])


# ---------------------------------------------------------------- stop requests
def test_stop_request_sets_a_flag_and_a_ctrl_c_after_it_quits():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = faults.StopRequest().install()
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the launcher sends it three times: still just a request
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ---------------------------------------------------------------- atomic checkpoints and final save
def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    def write(folder):
        open(os.path.join(folder, "weights"), "w").write("w")

    for step in (4, 6):
        checkpoint_files.save(str(tmp_path), step, write, {"global_step": step})
    # a run resumed from an older checkpoint writes checkpoint-3 while 4 and 6 exist
    checkpoint_files.save(str(tmp_path), 3, write, {"global_step": 3}, total_limit=2)
    assert [s for s, _ in checkpoint_files.list_checkpoints(str(tmp_path))] == [3, 6]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_everything_a_checkpoint_writes_or_deletes_is_rank_0s_work_alone(tmp_path, monkeypatch):
    """Checkpointer.save hands rank 0's disk work to `alone` (distributed.on_rank_0, whose heartbeats the other ranks
    join): the training state, the weights, publishing, and deleting old checkpoints (--checkpoints_total_limit).
    Outside it the other ranks would wait in one collective for as long as the disk takes (gloo gives up at 30 s)."""
    from types import SimpleNamespace

    inside, done = [False], []

    def alone(work):
        inside[0] = True
        try:
            return work()
        finally:
            inside[0] = False

    def recorded(name, real):
        def call(*args, **kwargs):
            done.append((name, inside[0]))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(checkpoint_files, "write_state", recorded("state", checkpoint_files.write_state))
    monkeypatch.setattr(checkpoint_files, "discard", recorded("delete", checkpoint_files.discard))
    state = SimpleNamespace(state_dict=lambda: {})
    args = SimpleNamespace(output_dir=str(tmp_path), checkpoints_total_limit=1, sharding=None)
    saver = checkpoint.Checkpointer(args, 0, recorded("weights", lambda folder: None), None, state, state, state, None)
    for step in (1, 2):
        saver.save(step, alone)
    assert [s for s, _ in checkpoint_files.list_checkpoints(str(tmp_path))] == [2]
    assert {name for name, _ in done} == {"state", "weights", "delete"}
    assert all(alone_ for _, alone_ in done), done


def test_partial_leftovers_are_ignored_then_removed_with_one_warning_each(tmp_path):
    checkpoint_files.save(str(tmp_path), 2, lambda folder: None, {"global_step": 2})
    (tmp_path / ".tmp-checkpoint-3").mkdir()  # a save killed half-way
    (tmp_path / ".tmp-checkpoint-3" / "training_state.pdparams").write_text("half")
    (tmp_path / "checkpoint-4").mkdir()  # not ours: no training state, so not a checkpoint
    assert checkpoint.resolve("latest", str(tmp_path)).endswith("checkpoint-2")
    log = Log()
    checkpoint_files.remove_partial(str(tmp_path), log)
    assert log.lines == [f"warning: removing {tmp_path / '.tmp-checkpoint-3'}: left incomplete by an interrupted run"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]


def fake_pipeline(version):
    def write(folder):
        for sub in ("prior", "scheduler"):
            os.makedirs(os.path.join(folder, sub))
            open(os.path.join(folder, sub, "weights"), "w").write(version)
        json.dump({"version": version}, open(os.path.join(folder, "model_index.json"), "w"))
        return f"pipeline {version}"

    return write


def test_final_save_never_leaves_a_loadable_looking_broken_output(tmp_path, monkeypatch):
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "logs"))
    assert checkpoint_files.publish(out, fake_pipeline("old")) == "pipeline old"
    rename, calls = os.rename, []

    def failing_rename(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # in the middle of moving the new folders in
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(faults.RunError, match=r"cannot write the final model to .*No space left on device; "
                                              r"no checkpoint was written yet"):
        checkpoint_files.publish(out, fake_pipeline("new"))
    monkeypatch.setattr(os, "rename", rename)
    # no model_index.json: nothing in output_dir loads as a pipeline; no temporary folder is left
    assert sorted(os.listdir(out)) == ["logs", "prior", "scheduler"]
    assert checkpoint_files.publish(out, fake_pipeline("new")) == "pipeline new"
    assert json.load(open(os.path.join(out, "model_index.json"))) == {"version": "new"}
    assert open(os.path.join(out, "prior", "weights")).read() == "new"
    assert sorted(os.listdir(out)) == ["logs", "model_index.json", "prior", "scheduler"]


# ---------------------------------------------------------------- a failing disk during training
def fail_lora_writes(monkeypatch, when):
    """The LoRA file writer fails like a full disk (after writing part of the file) for the folders `when` picks."""
    import safetensors.numpy

    save_file = safetensors.numpy.save_file

    def failing(tensors, path, metadata=None):
        if when(os.path.basename(os.path.dirname(path))):
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)


def train_lora(args):
    """The prior LoRA script in this process, its parameters named as in a fresh process (the optimizer state in
    a checkpoint is keyed by parameter names)."""
    import paddle

    with paddle.utils.unique_name.guard():
        train_text_to_image_prior_lora.main(args)


def test_disk_full_is_one_error_and_the_last_checkpoint_stays(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = model_args(tiny, out, "--max_train_steps", 4, "--checkpointing_steps", 1, "--train_batch_size", 2,
                      "--lora_rank", 2)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    fail_lora_writes(monkeypatch, lambda folder: folder == ".tmp-checkpoint-3")
    with pytest.raises(faults.RunError, match=rf"^cannot write checkpoint {out}/checkpoint-3: OSError: \[Errno 28\] "
                                              rf"No space left on device: .*; the last complete checkpoint, "
                                              rf"{out}/checkpoint-2, is intact$"):
        train_lora(args)
    assert sorted(n for n in os.listdir(out) if n != "logs") == ["checkpoint-1", "checkpoint-2"]
    assert sorted(os.listdir(out / "checkpoint-2")) == [lora.WEIGHTS_NAME, training_state.STATE_FILE,
                                                        training_state.STATE_TENSORS]
    assert training_state.load_state(str(out / "checkpoint-2"))["global_step"] == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers

    # resumed, it fails again on the final save: no LoRA file in output_dir, the checkpoints stay
    monkeypatch.undo()
    fail_lora_writes(monkeypatch, lambda folder: folder == ".tmp-output")
    with pytest.raises(faults.RunError, match=rf"^cannot write the final model to {out}: OSError: .*; "
                                              rf"the last complete checkpoint, {out}/checkpoint-4, is intact$"):
        train_lora(args + ["--resume_from_checkpoint", "latest"])
    assert sorted(n for n in os.listdir(out) if n != "logs") == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                                 "checkpoint-4"]


def test_resume_from_a_named_checkpoint_that_does_not_exist_is_an_error(tiny, tmp_path):
    with pytest.raises(UsageError, match="--resume_from_checkpoint checkpoint-7: no such checkpoint folder"):
        train_text_to_image_prior.main(model_args(tiny, tmp_path / "out", "--resume_from_checkpoint", "checkpoint-7"))
