"""The LoRA scripts: the base model stays frozen, only LoRA layers (all attention projections, the decoder's
added key/value ones included) get gradients and train, the loss falls, and the saved file loads with
`load_attn_procs` into a model that computes exactly what the trained one did. Validation runs after epoch 0,
every --validation_epochs and at the end without reloading the frozen models; old checkpoints are rotated out."""
import os

import numpy as np
import paddle
import pytest

import train_text_to_image_decoder_lora
import train_text_to_image_prior_lora
from conftest import logged, model_args, state_dict_of
from kandinsky_finetune import lora, models, optimization, precision, validation

# one test process for the whole module (-n 2): its tests take their module-scoped run by name
# (request.getfixturevalue), which conftest.py cannot see when it groups the tests sharing one
pytestmark = pytest.mark.xdist_group("test_lora")

STEPS = 40  # 8 samples in batches of 4: 2 steps per epoch, 20 epochs


class Spy:
    """Watches one in-process training run: the optimizer, the gradients at each optimizer step, the trained model,
    and how many components were loaded before training and at each validation."""

    def __init__(self, monkeypatch):
        self.grads_at_last_step, self.optimizer, self.model = None, None, None
        build_optimizer, step, save = optimization.build_optimizer, precision.Precision.step, lora.save

        def spy_build_optimizer(parameters, *a, **k):
            self.loads_before_training = self.loads
            self.optimizer, scheduler = build_optimizer(parameters, *a, **k)
            return self.optimizer, scheduler

        def spy_step(precision, optimizer):
            # sizes, not the tensors: clear_grad() zeroes gradient tensors in place after the step
            self.grads_at_last_step = {name: None if p.grad is None else float(p.grad.abs().sum())
                                       for name, p in self.model_ref.named_parameters()}
            step(precision, optimizer)

        def spy_save(model, folder):
            if os.path.dirname(os.path.abspath(folder)) == os.path.abspath(self.output_dir):  # a temporary folder in it
                self.model = model
            save(model, folder)

        # how many components were loaded (from_pretrained) by then, at each validation
        self.loads, self.loads_before_training, self.loads_at_validation = 0, None, []
        load, validate = models.load, validation.run

        def counting_load(*a, **k):
            self.loads += 1
            return load(*a, **k)

        def spy_validate(*a, **k):
            self.loads_at_validation.append(self.loads)
            validate(*a, **k)

        monkeypatch.setattr(optimization, "build_optimizer", spy_build_optimizer)
        monkeypatch.setattr(precision.Precision, "step", spy_step)
        monkeypatch.setattr(lora, "save", spy_save)
        monkeypatch.setattr(models, "load", counting_load)
        monkeypatch.setattr(validation, "run", spy_validate)


def train_in_process(script, tiny, out, rank_flag="--lora_rank"):
    # the spies watch this run only: patched for its duration, so a later run's calls are not counted here
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = Spy(monkeypatch)
        spy.output_dir = str(out)
        add_lora = lora.add_lora

        def spy_add_lora(model, rank):
            spy.model_ref = model
            return add_lora(model, rank)

        monkeypatch.setattr(lora, "add_lora", spy_add_lora)
        script.main(model_args(tiny, out, "--max_train_steps", STEPS, "--train_batch_size", 4, "--learning_rate", 3e-2,
                               "--lr_warmup_steps", 0, rank_flag, 8, "--checkpointing_steps", 10,
                               "--checkpoints_total_limit", 2, "--validation_prompt", "a red picture",
                               "--validation_epochs", 10, "--num_validation_images", 1))
    return spy


@pytest.fixture(scope="module")
def decoder_lora(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder_lora") / "out"
    return train_in_process(train_text_to_image_decoder_lora, tiny, out), out


@pytest.fixture(scope="module")
def prior_lora(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior_lora") / "out"
    # --rank is the diffusers spelling of --lora_rank
    spy = train_in_process(train_text_to_image_prior_lora, tiny, out, rank_flag="--rank")
    return spy, out


RUNS = ["decoder_lora", "prior_lora"]


@pytest.mark.parametrize("run_name", RUNS)
def test_only_lora_trains(run_name, request):
    spy, out = request.getfixturevalue(run_name)
    names = {id(p): n for n, p in spy.model.named_parameters()}
    optimized = [names[id(p)] for p in spy.optimizer._parameter_list]
    assert optimized and all(".lora_layer." in n for n in optimized)
    grads = spy.grads_at_last_step
    base_with_grad = [n for n, g in grads.items() if ".lora_layer." not in n and g is not None]
    assert base_with_grad == []
    lora_without_grad = [n for n, g in grads.items() if ".lora_layer." in n and not g]
    assert lora_without_grad == []
    assert set(optimized) == {n for n in grads if ".lora_layer." in n}


@pytest.mark.parametrize("run_name,expected", [
    ("decoder_lora", {"to_q", "to_k", "to_v", "to_out", "add_k_proj", "add_v_proj"}),  # added-KV attention
    ("prior_lora", {"to_q", "to_k", "to_v", "to_out"}),
])
def test_lora_sits_on_every_attention_projection(run_name, expected, request):
    from ppdiffusers.models.attention_processor import Attention

    spy, _ = request.getfixturevalue(run_name)
    attentions = [(name, m) for name, m in spy.model.named_sublayers() if isinstance(m, Attention)]
    assert attentions
    for name, module in attentions:
        with_lora = {n.split(".")[0] for n, m in module.named_sublayers() if getattr(m, "lora_layer", None) is not None}
        assert with_lora == expected, name


@pytest.mark.parametrize("run_name", RUNS)
def test_lora_loss_falls(run_name, request):
    _, out = request.getfixturevalue(run_name)
    losses = logged(out)
    assert len(losses) == STEPS
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])


@pytest.mark.parametrize("run_name", RUNS)
def test_base_weights_unchanged(run_name, request, tiny):
    spy, _ = request.getfixturevalue(run_name)
    sub = "unet" if run_name == "decoder_lora" else "prior"
    original = state_dict_of(os.path.join(tiny.decoder if sub == "unet" else tiny.prior, sub))
    live = {n: p.numpy() for n, p in spy.model.named_parameters() if ".lora_layer." not in n}
    assert original.keys() == live.keys()
    assert all(np.array_equal(original[k], live[k]) for k in original)


def test_saved_lora_reproduces_the_trained_decoder(decoder_lora, tiny):
    from ppdiffusers import UNet2DConditionModel

    spy, out = decoder_lora
    loaded = UNet2DConditionModel.from_pretrained(os.path.join(tiny.decoder, "unet"))
    loaded.load_attn_procs(str(out))  # what users do (README)
    x, t, emb = paddle.randn([2, 4, 8, 8]), paddle.to_tensor([10, 500]), paddle.randn([2, 32])
    spy.model.eval()
    with paddle.no_grad():
        trained = spy.model(x, t, None, added_cond_kwargs={"image_embeds": emb}).sample
        reloaded = loaded(x, t, None, added_cond_kwargs={"image_embeds": emb}).sample
        base = UNet2DConditionModel.from_pretrained(os.path.join(tiny.decoder, "unet"))(
            x, t, None, added_cond_kwargs={"image_embeds": emb}).sample
    assert float((trained - base).abs().max()) > 1e-3  # LoRA changed the model
    np.testing.assert_allclose(reloaded.numpy(), trained.numpy(), atol=1e-5)


def test_saved_lora_reproduces_the_trained_prior(prior_lora, tiny):
    from ppdiffusers import PriorTransformer

    spy, out = prior_lora
    loaded = PriorTransformer.from_pretrained(os.path.join(tiny.prior, "prior"))
    loaded.load_attn_procs(str(out))
    inputs = dict(hidden_states=paddle.randn([2, 32]), timestep=paddle.to_tensor([10, 500]),
                  proj_embedding=paddle.randn([2, 32]), encoder_hidden_states=paddle.randn([2, 77, 32]),
                  attention_mask=paddle.ones([2, 77], dtype="bool"))
    spy.model.eval()
    with paddle.no_grad():
        trained = spy.model(**inputs).predicted_image_embedding
        reloaded = loaded(**inputs).predicted_image_embedding
        base = PriorTransformer.from_pretrained(os.path.join(tiny.prior, "prior"))(**inputs).predicted_image_embedding
    assert float((trained - base).abs().max()) > 1e-3
    np.testing.assert_allclose(reloaded.numpy(), trained.numpy(), atol=1e-5)


@pytest.mark.parametrize("run_name", RUNS)
def test_lora_file_is_small_and_checkpoints_hold_it(run_name, request):
    _, out = request.getfixturevalue(run_name)
    size = os.path.getsize(out / lora.WEIGHTS_NAME)
    print(f"{run_name}: {lora.WEIGHTS_NAME} is {size / 1e3:.1f} kB at rank 8")
    assert size < 200_000
    # checkpoints at steps 10, 20, 30, 40; --checkpoints_total_limit 2 keeps the last two
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-30", "checkpoint-40"]
    assert sorted(os.listdir(out / "checkpoint-40")) == [lora.WEIGHTS_NAME, "training_state.pdparams",
                                                      "training_state.safetensors"]


@pytest.mark.parametrize("run_name", RUNS)
def test_validation_after_epoch_0_every_10_epochs_and_at_the_end(run_name, request):
    from PIL import Image

    spy, out = request.getfixturevalue(run_name)
    # epoch 0 ends at step 2, epoch 10 at step 22 (epoch 20 would be step 42 > 40); the end of training is step 40
    folders = sorted(os.listdir(out / "validation"), key=lambda name: int(name.split("-")[1]))
    assert folders == ["step-2", "step-22", "step-40"]
    for folder in folders:
        assert sorted(os.listdir(out / "validation" / folder)) == ["0.png", "grid.png"]  # --num_validation_images 1
        with Image.open(out / "validation" / folder / "0.png") as image:
            assert image.format == "PNG" and image.size == (64, 64)  # --resolution
    # the frozen components a validation needs beyond training (the other model's) are loaded for each validation
    # and released after it, as the references free their validation pipeline: each one loads the same again
    assert len(spy.loads_at_validation) == 3
    per_validation = spy.loads_at_validation[0] - spy.loads_before_training
    assert per_validation > 0 and spy.loads_before_training > 0
    assert spy.loads_at_validation == [spy.loads_at_validation[0] + k * per_validation for k in range(3)]
    assert spy.loads == spy.loads_at_validation[-1]
