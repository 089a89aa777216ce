"""The optimizer step's own clipping: weights bit-identical to Paddle's ClipGradByGlobalNorm, and the clipping's
norm is the finite-gradient check."""
import numpy as np
import paddle
import pytest

from kandinsky_finetune.optimization import clip_gradients


def train(max_norm, own_clipping, steps=12):
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(16, 32), paddle.nn.GELU(), paddle.nn.Linear(32, 8),
                                 paddle.nn.LayerNorm(8))
    clip = None if own_clipping else paddle.nn.ClipGradByGlobalNorm(max_norm)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=model.parameters(), weight_decay=0.0,
                                       grad_clip=clip)
    rng = np.random.default_rng(0)
    for step in range(steps):
        x = paddle.to_tensor(rng.standard_normal((4, 16), dtype="float32") * (1 + step % 3) * 3)
        (model(x) ** 2).mean().backward()
        if own_clipping:
            assert clip_gradients([p.grad for p in model.parameters()], max_norm)
        optimizer.step()
        optimizer.clear_grad(set_to_zero=False)
    return [p.numpy() for p in model.parameters()]


@pytest.mark.parametrize("max_norm", [0.01, 1.0, 1e6])
def test_weights_are_bit_identical_to_paddles_clipping(max_norm):
    ours, paddles = train(max_norm, True), train(max_norm, False)
    assert all(np.array_equal(a, b) for a, b in zip(ours, paddles))


def test_clipping_changes_the_update_when_the_norm_is_over_the_limit():
    clipped, free = train(0.01, True), train(1e6, True)
    assert not all(np.array_equal(a, b) for a, b in zip(clipped, free))


def test_the_norm_scales_gradients_in_place_to_the_limit():
    grads = [paddle.to_tensor([3.0, 0.0]), paddle.to_tensor([[4.0]])]
    assert clip_gradients(grads + [None], 1.0)
    assert float(paddle.sqrt(sum((g ** 2).sum() for g in grads))) == pytest.approx(1.0, rel=1e-6)
    assert grads[0].numpy() == pytest.approx([0.6, 0.0], rel=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_is_reported(bad):
    assert not clip_gradients([paddle.to_tensor([1.0, 2.0]), paddle.to_tensor([bad])], 1.0)


@pytest.mark.parametrize("dtypes", [("float32", "float64"), ("float64", "float64")])
def test_gradients_of_other_dtypes_are_scaled_in_their_own(dtypes):
    grads = [paddle.to_tensor([3.0, 0.0]).astype(dtypes[0]), paddle.to_tensor([[4.0]]).astype(dtypes[1])]
    assert clip_gradients(grads, 1.0)
    assert [str(g.dtype) for g in grads] == [f"paddle.{d}" for d in dtypes]
    assert grads[0].numpy() == pytest.approx([0.6, 0.0], rel=1e-6)
    assert grads[1].numpy().ravel() == pytest.approx([0.8], rel=1e-6)
