"""--gradient_checkpointing recomputes activations in backward (prior: every transformer block; decoder: the UNet's
blocks) and gives the same gradients as a plain backward, for full fine-tuning and for LoRA on a frozen base."""
import os

import numpy as np
import paddle
import paddle.distributed.fleet.utils as fleet_utils
import ppdiffusers.models.unet_2d_blocks as unet_blocks
import pytest

from kandinsky_finetune import lora, models


def prior_inputs():
    paddle.seed(1)
    return dict(hidden_states=paddle.randn([2, 32]), timestep=paddle.to_tensor([10, 500]),
                proj_embedding=paddle.randn([2, 32]), encoder_hidden_states=paddle.randn([2, 77, 32]),
                attention_mask=paddle.arange(77).unsqueeze(0).expand([2, 77]) < paddle.to_tensor([[5], [9]]))


def unet_inputs():
    paddle.seed(1)
    return (paddle.randn([2, 4, 8, 8]), paddle.to_tensor([10, 500])), dict(
        encoder_hidden_states=None, added_cond_kwargs={"image_embeds": paddle.randn([2, 32])})


def gradients(model, call):
    model.train()
    call(model).square().mean().backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return grads


def counting(monkeypatch, module):
    calls = []
    original = module.recompute

    def recompute(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "recompute", recompute)
    return calls


@pytest.mark.parametrize("with_lora", [False, True])
def test_prior_recomputes_blocks_with_identical_gradients(tiny, monkeypatch, with_lora):
    from ppdiffusers import PriorTransformer

    def load():
        prior = PriorTransformer.from_pretrained(os.path.join(tiny.prior, "prior"))
        if with_lora:
            paddle.seed(0)
            lora.add_lora(prior, 4)
            for p in lora.lora_parameters(prior):  # nonzero up-projections, so every LoRA weight gets a gradient
                p.set_value(paddle.randn(p.shape) * 0.1)
        return prior

    call = lambda m: m(**prior_inputs()).predicted_image_embedding  # noqa: E731
    plain = gradients(load(), call)
    checkpointed_prior = load()
    models.enable_prior_gradient_checkpointing(checkpointed_prior)
    calls = counting(monkeypatch, fleet_utils)
    checkpointed = gradients(checkpointed_prior, call)
    assert len(calls) == len(checkpointed_prior.transformer_blocks)
    assert plain.keys() == checkpointed.keys() and plain
    if with_lora:
        assert all(".lora_layer." in n for n in plain)
    for name in plain:
        np.testing.assert_allclose(checkpointed[name], plain[name], atol=1e-6, err_msg=name)


def test_decoder_unet_recomputes_with_identical_gradients(tiny, monkeypatch):
    from ppdiffusers import UNet2DConditionModel

    args, kwargs = unet_inputs()
    call = lambda m: m(*args, **kwargs).sample  # noqa: E731
    plain = gradients(UNet2DConditionModel.from_pretrained(os.path.join(tiny.decoder, "unet")), call)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(tiny.decoder, "unet"))
    unet.enable_gradient_checkpointing()
    calls = counting(monkeypatch, unet_blocks)
    checkpointed = gradients(unet, call)
    assert len(calls) > 0
    for name in plain:
        np.testing.assert_allclose(checkpointed[name], plain[name], atol=1e-6, err_msg=name)
