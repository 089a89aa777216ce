"""Min-SNR weights and the weighted loss on known values (per sample, for each prediction type)."""
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from kandinsky_finetune.diffusion import diffusion_loss, min_snr_weights
from kandinsky_finetune.steps import accumulation_groups, plan_steps

ALPHAS_CUMPROD = paddle.to_tensor([0.5, 0.9, 0.05])  # SNR = 1, 9, 1/19
TIMESTEPS = paddle.to_tensor([1, 0, 2])


@pytest.mark.parametrize("prediction_type,expected", [
    ("epsilon", [5 / 9, 1.0, 1.0]),             # min(snr, 5) / snr
    ("sample", [5.0, 1.0, 1 / 19]),             # min(snr, 5)
    ("v_prediction", [0.5, 0.5, 0.05]),          # min(snr, 5) / (snr + 1)
])
def test_min_snr_weights_per_sample(prediction_type, expected):
    w = min_snr_weights(ALPHAS_CUMPROD, TIMESTEPS, 5.0, prediction_type)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)


def test_weighted_loss_weights_each_sample():
    scheduler = SimpleNamespace(alphas_cumprod=ALPHAS_CUMPROD, config=SimpleNamespace(prediction_type="sample"))
    pred = paddle.zeros([3, 2])
    target = paddle.to_tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # per-sample MSE 1, 4, 9
    loss = diffusion_loss(pred, target, TIMESTEPS, scheduler, snr_gamma=5.0)
    np.testing.assert_allclose(loss.item(), (5.0 * 1 + 1.0 * 4 + 9 / 19) / 3, rtol=1e-5)
    assert diffusion_loss(pred, target, TIMESTEPS, scheduler, snr_gamma=None).item() == pytest.approx(14 / 3)


def test_plan_counts_optimizer_steps_and_keeps_the_short_last_group():
    assert plan_steps(batches_per_epoch=10, accumulation=4, num_train_epochs=3, max_train_steps=None) == (3, 9, 3)
    assert plan_steps(batches_per_epoch=10, accumulation=4, num_train_epochs=3, max_train_steps=4) == (3, 4, 2)
    groups = [(b, size, last) for b, size, last in accumulation_groups(range(10), 10, 4)]
    assert [size for _, size, _ in groups] == [4] * 8 + [2] * 2
    assert [b for b, _, last in groups if last] == [3, 7, 9]
