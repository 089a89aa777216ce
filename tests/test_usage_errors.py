"""More input that must fail before training with one clear line: an unreachable hub for --push_to_hub, a checkpoint
written by another model or LoRA rank; and --mixed_precision's frozen models go back to fp32 before they are saved."""
import numpy as np
import paddle
import pytest

import train_text_to_image_prior
import train_text_to_image_prior_lora
from conftest import model_args
from kandinsky_finetune.params import UsageError
from kandinsky_finetune.tracking import Log
from kandinsky_finetune.training import Precision


def test_push_to_hub_without_a_reachable_hub_fails_before_training(tiny, tmp_path):
    # CI has no route to the Hub (and no token): the run must stop now, not after hours of training
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--push_to_hub: cannot create or reach the Hugging Face repo"):
        train_text_to_image_prior.main(model_args(tiny, out, "--max_train_steps", 1, "--push_to_hub"))
    assert not out.exists()


def test_resume_with_another_lora_rank_is_one_clear_error(tiny, tmp_path):
    out = tmp_path / "out"
    train_text_to_image_prior_lora.main(model_args(tiny, out, "--max_train_steps", 1, "--checkpointing_steps", 1))
    with pytest.raises(UsageError, match="checkpoint-1 does not fit this run .*resume with the model, --lora_rank"):
        train_text_to_image_prior_lora.main(model_args(tiny, out, "--max_train_steps", 2, "--lora_rank", 8,
                                                       "--resume_from_checkpoint", "latest"))


def test_frozen_models_cast_for_mixed_precision_are_saved_in_fp32():
    precision = Precision("no", Log(False))
    precision.enabled, precision.dtype = True, "float16"  # what --mixed_precision fp16 does on a GPU
    paddle.seed(0)
    frozen = paddle.nn.Linear(4, 4)
    original = frozen.weight.numpy().copy()
    precision.cast_frozen(frozen)
    assert frozen.weight.dtype == paddle.float16
    precision.frozen_back_to_fp32()
    assert frozen.weight.dtype == paddle.float32
    np.testing.assert_allclose(frozen.weight.numpy(), original, atol=1e-3)
