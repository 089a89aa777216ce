"""Resume continues exactly: stopping at a checkpoint and resuming gives the uninterrupted run's weights
and optimizer state (in the middle of an epoch, with gradient accumulation and EMA); a partial checkpoint
left by a crash is ignored, and removed with a warning."""
import glob
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import model_args, run_script, state_dict_of
from kandinsky_finetune.training_state import load_state


def assert_same_weights(a, b):
    wa, wb = state_dict_of(a), state_dict_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, err_msg=k)


def assert_same_state(a, b):
    sa, sb = load_state(str(a)), load_state(str(b))
    assert sa["global_step"] == sb["global_step"] and sa["seed"] == sb["seed"]
    assert sa["lr_scheduler"] == sb["lr_scheduler"]
    opt_a, opt_b = sa["optimizer"], sb["optimizer"]
    assert opt_a.keys() == opt_b.keys()
    moments = [k for k in opt_a if "moment" in k]
    assert moments  # the optimizer's tensors are compared, not skipped
    for k in opt_a:
        if hasattr(opt_a[k], "numpy"):
            np.testing.assert_allclose(opt_a[k].numpy(), opt_b[k].numpy(), atol=1e-6, err_msg=k)
    if sa["ema"] is not None:
        assert sa["ema"]["optimization_step"] == sb["ema"]["optimization_step"]
        for x, y in zip(sa["ema"]["shadow_params"], sb["ema"]["shadow_params"]):
            np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-6)


@pytest.mark.parametrize("script,model,extra", [
    ("train_text_to_image_prior.py", "prior", []),
    # 8 samples, batch 2, 2 micro-batches per step: 2 steps per epoch, so step 3 is mid-epoch
    ("train_text_to_image_decoder.py", "unet", ["--use_ema", "--gradient_accumulation_steps", 2]),
    # LoRA checkpoints hold the LoRA file itself ("" = the checkpoint folder)
    # with the encoders' outputs read from the cache (both runs)
    ("train_text_to_image_prior_lora.py", "", ["--gradient_accumulation_steps", 2, "--cache_encoder_outputs"]),
    ("train_text_to_image_decoder_lora.py", "", ["--dataloader_num_workers", 1]),  # a loader worker process
])
def test_resume_matches_uninterrupted_run(tiny, tmp_path, script, model, extra):
    common = ["--train_batch_size", 2, "--learning_rate", 1e-3, "--lr_scheduler", "linear", "--lr_warmup_steps", 2,
              "--checkpointing_steps", 3, "--max_train_steps", 6, *extra]
    full = tmp_path / "full"
    run_script(script, *model_args(tiny, full, *common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")  # as if the run had stopped after step 3
    # ... while writing checkpoint-4: a partial folder, which `latest` ignores and the run removes with a warning
    shutil.copytree(full / "checkpoint-6", resumed / ".tmp-checkpoint-4")
    (resumed / ".tmp-checkpoint-4" / "training_state.pdparams").write_bytes(b"half")
    proc = run_script(script, *model_args(tiny, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("warning: removing")] == [
        f"warning: removing {resumed / '.tmp-checkpoint-4'}: left incomplete by an interrupted run"]
    assert not [name for name in os.listdir(resumed) if name.startswith(".tmp-")]
    assert_same_weights(full / "checkpoint-6" / model, resumed / "checkpoint-6" / model)
    assert_same_state(full / "checkpoint-6", resumed / "checkpoint-6")
    if "--use_ema" in extra:
        assert_same_weights(full / "checkpoint-6" / f"{model}_ema", resumed / "checkpoint-6" / f"{model}_ema")
        # the final save is the EMA model
        assert_same_weights(full / model, full / "checkpoint-6" / f"{model}_ema")


def tensorboard_scalars(path):
    """{tag: [(step, value), ...]} of a tensorboard events file (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars, data = {}, Path(path).read_bytes()
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        event = Event.FromString(data[12:12 + length])  # after the length and its CRC
        data = data[12 + length + 4:]  # and the record's CRC
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_resume_latest_without_checkpoint_starts_fresh(tiny, tmp_path):
    # also: --report_to tensorboard logs there, under output_dir/logs/<--tracker_project_name default>
    out = tmp_path / "out"
    proc = run_script("train_text_to_image_prior.py", *model_args(
        tiny, out, "--max_train_steps", 1, "--resume_from_checkpoint", "latest", "--report_to", "tensorboard"))
    assert "starting a new run" in proc.stderr
    events = glob.glob(str(out / "logs" / "text2image-fine-tune" / "events.out.tfevents*"))
    assert len(events) == 1, os.listdir(out / "logs")
    assert glob.glob(str(out / "**" / "vdlrecords*"), recursive=True) == []  # no VisualDL log besides
    scalars = tensorboard_scalars(events[0])
    assert [step for step, _ in scalars["train_loss"]] == [1] and scalars["train_loss"][0][1] > 0
    assert [step for step, _ in scalars["lr"]] == [1]
