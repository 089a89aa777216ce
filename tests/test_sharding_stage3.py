"""--sharding stage3 on 2 CPU processes: Paddle's GroupShardedStage3 with its device checks lifted (stage3_on_cpu.py;
Paddle runs stage 3 on GPUs only, and on a CPU the scripts stop with one line, test_sharding.py). It trains the weights
of plain data parallelism while each rank holds about half of the trained weights and of AdamW's state; its
checkpoints hold both whole and resume exactly; validation runs on every rank together and makes the images data
parallelism makes; the decoder scripts, full and LoRA, run and save."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, state_dict_of
from test_sharding import COMMON, assert_same_optimizer_state
from test_sharding import launch as launch_2_processes
from kandinsky_finetune.training_state import load_state

SCRIPT = "train_text_to_image_prior.py"
SHIM = ROOT / "tests" / "stage3_on_cpu.py"
# no clipping: Paddle's stage-3 clip (GroupShardedClipGrad) reads a GPU's index from the device name, none on a CPU.
# 12 epochs of one step: validation after epochs 0 and 6, and at the end
STAGE3 = [*COMMON, "--max_grad_norm", 0, "--validation_prompts", "a red cat", "--num_inference_steps", 2,
          "--validation_epochs", 6]
# The attention's key bias moves no loss (softmax ignores what it adds to every score alike): its gradient is rounding
# noise, which AdamW turns into steps of the learning rate's size, so any other order of summation moves it elsewhere
NO_GRADIENT = "to_k.bias"


def launch(tiny, tmp_path, name, *extra, script=SCRIPT, stage3=True, common=STAGE3):
    """A 2-process launch into tmp_path/name (through the shim with `stage3`); (output folder, rank 0's log)."""
    program = [SHIM, script, "--sharding", "stage3"] if stage3 else [ROOT / script]
    return launch_2_processes(tiny, tmp_path, name, *extra, program=program, common=common)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage3")
    found = {"dp": launch(tiny, tmp, "dp", stage3=False), "stage3": launch(tiny, tmp, "stage3")}
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(found["stage3"][0] / "checkpoint-6", resumed / "checkpoint-6")
    found["resumed"] = launch(tiny, tmp, "resumed", "--resume_from_checkpoint", "latest")
    return found


def assert_same_weights(a, b, atol=1e-5, skip=NO_GRADIENT):
    wa, wb = state_dict_of(a), state_dict_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if skip not in k:
            np.testing.assert_allclose(wa[k], wb[k], atol=atol, err_msg=k)


def test_stage3_trains_the_weights_of_data_parallel_and_checkpoints_the_whole_state(runs):
    (dp, _), (sharded, _) = runs["dp"], runs["stage3"]
    assert_same_weights(dp / "prior", sharded / "prior")
    assert_same_weights(dp / "checkpoint-12" / "prior", sharded / "checkpoint-12" / "prior")
    assert_same_optimizer_state(dp / "checkpoint-12", sharded / "checkpoint-12")  # whole, as unsharded runs save it


def test_stage3_each_rank_holds_about_half_of_the_weights_and_the_optimizer_state(runs):
    out, log = runs["stage3"]
    shares = [(float(state), float(weights)) for state, weights in re.findall(
        r"rank \d ([\d.]+) MB in \d+ tensors \(trained weights ([\d.]+) MB\)", log)]
    assert len(shares) == 2, log
    whole_state = sum(v.numpy().nbytes for v in load_state(str(out / "checkpoint-12"))["optimizer"].values()
                      if hasattr(v, "numpy")) / 1e6
    whole_weights = sum(a.nbytes for a in state_dict_of(out / "prior").values()) / 1e6
    for state, weights in shares:  # half, plus what stays whole (biases, norms: small) and the slices' padding
        assert 0.45 * whole_state < state < 0.6 * whole_state, (shares, whole_state)
        assert 0.45 * whole_weights < weights < 0.6 * whole_weights, (shares, whole_weights)


def test_a_stage3_resume_continues_exactly(runs):
    assert "resumed from" in runs["resumed"][1] and "checkpoint-6 at step 6" in runs["resumed"][1]
    assert_same_weights(runs["resumed"][0] / "prior", runs["stage3"][0] / "prior", atol=0, skip="(nothing)")
    assert_same_optimizer_state(runs["resumed"][0] / "checkpoint-12", runs["stage3"][0] / "checkpoint-12", atol=0)


def test_stage3_validation_makes_the_images_of_data_parallel(runs):
    (dp, _), (sharded, log) = runs["dp"], runs["stage3"]
    rounds = sorted(p.name for p in (sharded / "validation").iterdir())
    assert rounds == sorted(p.name for p in (dp / "validation").iterdir()) and len(rounds) == 3, rounds
    for name in rounds:
        a, b = (np.asarray(Image.open(out / "validation" / name / "0.png"), dtype=float) for out in (dp, sharded))
        assert np.abs(a - b).mean() < 1.0, name  # (weights equal within 1e-5)
    assert log.count("validation images:") == 3


@pytest.mark.parametrize("script,saved", [("train_text_to_image_decoder.py", "unet"),  # the whole UNet
                                          ("train_text_to_image_decoder_lora.py", "")])  # LoRA: the base is sliced
def test_the_decoder_scripts_train_with_stage3(tiny, tmp_path, script, saved):
    common = ["--max_train_steps", 2, "--checkpointing_steps", 2, "--train_batch_size", 2, "--max_grad_norm", 0]
    out, log = launch(tiny, tmp_path, "out", script=script, common=common)
    trained = state_dict_of(out / saved)
    if saved:  # the saved UNet is the trained one
        source = state_dict_of(Path(tiny.decoder) / "unet")
        assert any(not np.array_equal(trained[k], source[k]) for k in source)
    state = load_state(str(out / "checkpoint-2"))
    moments = {k: v for k, v in state["optimizer"].items() if "moment" in k}
    assert len(moments) == 2 * len(trained) and not any(k.startswith("slice@") for k in state["optimizer"])
    shapes = {tuple(v.shape) for v in moments.values()}
    assert shapes <= {tuple(a.shape) for a in trained.values()}  # whole moments, in the parameters' shapes
    assert len(re.findall(r"rank \d [\d.]+ MB in \d+ tensors", log)) == 2
