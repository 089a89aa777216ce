"""Gradient accumulation is exact: one step on a batch of 4 equals one step of 4 accumulated batches of 1,
and the logged loss is the mean over the micro-batches."""
import numpy as np

from conftest import logged, model_args, run_script, state_dict_of


def test_batch_of_4_equals_4_accumulated_batches_of_1(tiny, tmp_path):
    # A huge Adam epsilon makes the first update lr * g / eps, linear in the gradient, so a wrongly scaled
    # accumulated gradient shows (plain Adam's first step is scale-free); no clipping for the same reason.
    common = ["--max_train_steps", 1, "--checkpointing_steps", 1, "--learning_rate", 100, "--adam_epsilon", 100,
              "--max_grad_norm", 0, "--lr_warmup_steps", 0, "--max_train_samples", 4]
    run_script("train_text_to_image_prior.py", *model_args(tiny, tmp_path / "b4", *common, "--train_batch_size", 4))
    run_script("train_text_to_image_prior.py", *model_args(
        tiny, tmp_path / "b1x4", *common, "--train_batch_size", 1, "--gradient_accumulation_steps", 4))
    start = state_dict_of(f"{tiny.prior}/prior")
    a, b = state_dict_of(tmp_path / "b4" / "prior"), state_dict_of(tmp_path / "b1x4" / "prior")
    moved = max(np.abs(a[k] - start[k]).max() for k in a)
    assert moved > 1e-4  # the step did change the weights
    diff = max(np.abs(a[k] - b[k]).max() for k in a)
    assert diff < 1e-3 * moved, f"accumulated step differs by {diff} (step size {moved})"
    np.testing.assert_allclose(logged(tmp_path / "b4"), logged(tmp_path / "b1x4"), rtol=1e-5)
