"""Gradient accumulation and averaging are exact: one step on a batch of 4 equals one step of 4 accumulated
batches of 1, and one step of 2 processes with a batch of 2 each (the gradient is averaged across ranks, not
summed); the logged loss is the mean over the micro-batches (and the ranks)."""
import sys

import numpy as np
import pytest

from conftest import ROOT, logged, model_args, run, run_script, state_dict_of

# A huge Adam epsilon makes the first update lr * g / eps, linear in the gradient, so a wrongly scaled
# accumulated (or all-reduced) gradient shows (plain Adam's first step is scale-free); no clipping for the same reason.
COMMON = ["--max_train_steps", 1, "--checkpointing_steps", 1, "--learning_rate", 100, "--adam_epsilon", 100,
          "--max_grad_norm", 0, "--lr_warmup_steps", 0, "--max_train_samples", 4]


@pytest.fixture(scope="module")
def batch_of_4(tiny, tmp_path_factory):
    """One step of the prior on the same 4 samples in one batch of 4, shared by the tests below."""
    out = tmp_path_factory.mktemp("b4") / "out"
    run_script("train_text_to_image_prior.py", *model_args(tiny, out, *COMMON, "--train_batch_size", 4))
    return out


def assert_same_step(tiny, reference, other):
    """`other` made the same (non-trivial) update as `reference`, up to float noise relative to the step size."""
    start = state_dict_of(f"{tiny.prior}/prior")
    a, b = state_dict_of(reference / "prior"), state_dict_of(other / "prior")
    moved = max(np.abs(a[k] - start[k]).max() for k in a)
    assert moved > 1e-4  # the step did change the weights
    diff = max(np.abs(a[k] - b[k]).max() for k in a)
    assert diff < 1e-3 * moved, f"step differs by {diff} (step size {moved})"
    np.testing.assert_allclose(logged(reference), logged(other), rtol=1e-5)


def test_batch_of_4_equals_4_accumulated_batches_of_1(tiny, tmp_path, batch_of_4):
    run_script("train_text_to_image_prior.py", *model_args(
        tiny, tmp_path / "b1x4", *COMMON, "--train_batch_size", 1, "--gradient_accumulation_steps", 4))
    assert_same_step(tiny, batch_of_4, tmp_path / "b1x4")


def test_batch_of_4_equals_2_processes_with_batches_of_2(tiny, tmp_path, batch_of_4):
    # each rank takes 2 of the 4 samples (same per-sample noise and timesteps, see data.py); DataParallel
    # all-reduces the gradients, and the step must use their mean: a sum would make a step twice as long
    out = tmp_path / "b2x2"
    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(tmp_path / "log"), str(ROOT / "train_text_to_image_prior.py"),
                *model_args(tiny, out, *COMMON, "--train_batch_size", 2, "--cache_dir", tmp_path / "hf")],
               cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + "".join(
        (tmp_path / "log" / f"workerlog.{r}").read_text()[-2000:] for r in (0, 1) if (tmp_path / "log").is_dir())
    assert "2 process(es)" in (tmp_path / "log" / "workerlog.0").read_text()
    assert_same_step(tiny, batch_of_4, out)


def test_a_micro_batch_backward_does_not_wait_for_the_device(monkeypatch):
    # On a GPU every read of a tensor's value waits for all queued work: the loop reads the step's losses once, after
    # the clipping's norm (Loop._step), not after each micro-batch
    from types import SimpleNamespace

    import paddle

    from kandinsky_finetune.tracking import Log
    from kandinsky_finetune.precision import Precision
    from kandinsky_finetune.training import Loop

    def read(*args, **kwargs):
        raise AssertionError("a micro-batch's backward read a value from the device")

    loop = SimpleNamespace(_group=2, _losses=[], precision=Precision("no", Log(False)))
    x = paddle.to_tensor([3.0], stop_gradient=False)
    with monkeypatch.context() as m:
        for name in ("item", "numpy", "tolist", "__float__"):
            m.setattr(paddle.Tensor, name, read)
        Loop.backward(loop, (x * x).sum())
    assert x.grad.numpy().tolist() == [3.0]  # d/dx of x^2 / 2
    assert [loss.numpy().tolist() for loss in loop._losses] == [4.5]
