"""Memory at real size without building anything big: the real architectures' parameter counts (models built
without memory), the memory plan's arithmetic against measured sizes on the tiny models, loading without a second
copy of the weights, frozen encoders released once their outputs are cached."""
import glob
import os
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from conftest import model_args, run_script
from kandinsky_finetune import activation_estimates, memory_plan, models, params, tiny_models


@pytest.mark.parametrize("name,expected", [
    # exact counts published for the hub repos' weights (kandinsky-community/kandinsky-2-2-prior, -decoder)
    ("prior", 1_026_225_920), ("unet", 1_253_057_288), ("movq", 67_832_495),
    # CLIP ViT-bigG/14 text tower with projection, from its config (vocab 49408, 77 positions, 32 x 1280, MLP 5120)
    ("text_encoder", 49408 * 1280 + 77 * 1280 + 32 * (4 * (1280 * 1280 + 1280) + 2 * 1280 * 5120 + 5120 + 1280
                                                      + 4 * 1280) + 2 * 1280 + 1280 * 1280),
])
def test_real_architectures_have_the_published_parameter_counts(name, expected):
    with models.lazy_init():  # shapes only: nothing is allocated
        model = tiny_models.build_model(tiny_models.REAL_SPEC, name)
    assert memory_plan.parameters(model) == expected


def test_real_image_encoder_is_vit_bigg():
    with models.lazy_init():
        model = tiny_models.build_model(tiny_models.REAL_SPEC, "image_encoder")
    # OpenCLIP ViT-bigG/14: 1844.9M parameters with its 1280-wide projection
    assert abs(memory_plan.parameters(model) - 1844.9e6) < 0.1e6


def plan_args(tiny, *extra, lora=False):
    parser = params.build_parser("test", lora=lora)
    params.add_prior_args(parser)
    return params.parse(parser, model_args(tiny, "unused", *extra))


def test_plan_matches_measured_parameter_and_optimizer_sizes(tiny):
    """The plan's trained weights, gradients and AdamW states against the tensors a real step creates."""
    from ppdiffusers import PriorTransformer

    plan = memory_plan.build(plan_args(tiny, "--use_ema"), "prior", lora=False)
    items = {label: size for label, size, _ in plan.phases["training"]}
    prior = models.load(PriorTransformer, tiny.prior, "prior", "--x")
    trainable = [p for p in prior.parameters() if not p.stop_gradient]
    weights = sum(p.size * p.element_size() for p in trainable)
    optimizer = paddle.optimizer.AdamW(parameters=trainable)
    for p in trainable:
        p.grad = paddle.ones_like(p)  # noqa: one step creates the moments
    gradients = sum(p.grad.size * p.grad.element_size() for p in trainable)
    optimizer.step()
    moments = sum(t.size * t.element_size() for table in optimizer._accumulators.values() for t in table.values()
                  if t.size > 1)  # the moments; the beta-power scalars are a few bytes per tensor
    assert items["trained weights"] == weights
    assert items["gradients"] == gradients
    assert items["optimizer states"] == moments
    assert items["EMA"] == weights


def test_plan_counts_lora_parameters_as_add_lora_makes_them(tiny):
    from ppdiffusers import PriorTransformer

    from kandinsky_finetune import lora

    plan = memory_plan.build(plan_args(tiny, "--lora_rank", 3, lora=True), "prior", lora=True)
    items = {label: size for label, size, _ in plan.phases["training"]}
    prior = models.load(PriorTransformer, tiny.prior, "prior", "--x")
    assert items["trained weights"] == 4 * sum(p.size for p in lora.add_lora(prior, 3))
    assert items["frozen base model"] == 4 * sum(p.size for p in prior.parameters() if p.stop_gradient)


def test_plan_releases_encoders_with_the_cache_and_knows_checkpointing(tiny):
    plain = memory_plan.build(plan_args(tiny), "prior", lora=False)
    cached = memory_plan.build(plan_args(tiny, "--cache_encoder_outputs", "--gradient_checkpointing"), "prior",
                               lora=False)
    frozen = lambda plan: dict((l, b) for l, b, _ in plan.phases["training"])["frozen encoders"]  # noqa: E731
    activations = lambda plan: dict((l, b) for l, b, _ in plan.phases["training"])["activations"]  # noqa: E731
    assert frozen(plain) > 0 and frozen(cached) == 0
    assert "encoding" in cached.phases and "encoding" not in plain.phases
    assert activations(cached) < activations(plain)


def test_print_memory_plan_needs_no_dataset_and_loads_no_weights(tiny, tmp_path):
    out = tmp_path / "out"
    proc = run_script("train_text_to_image_decoder.py", "--pretrained_prior_model_name_or_path", tiny.prior,
                      "--pretrained_decoder_model_name_or_path", tiny.decoder, "--resolution", 256,
                      "--output_dir", out, "--print_memory_plan")
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("memory plan per device (CPU, fp32, batch 1, 256 px): "), lines
    assert any(line.split()[:2] == ["trained", "weights"] and "the unet" in line for line in lines)
    assert not out.exists()


def test_a_model_that_cannot_be_found_is_one_error_line_and_no_plan_warning(tiny, tmp_path, capfd):
    """A repo whose image_encoder has no config, or a local path that does not exist: the run's one error line, the
    one loading would give, before anything else (not a plan warning first); the same with --print_memory_plan.
    One case runs as a user runs it (stderr: that line alone); the others in process (the UsageError, which
    params.run prints as that line, and nothing on stderr before it)."""
    import shutil

    import train_text_to_image_prior

    repo = tmp_path / "prior"
    shutil.copytree(tiny.prior, repo)
    os.remove(repo / "image_encoder" / "config.json")
    for bad, expected in [(repo, f"error: cannot load image_encoder of --pretrained_prior_model_name_or_path {repo}: "),
                          (tmp_path / "missing", f"error: --pretrained_prior_model_name_or_path {tmp_path / 'missing'}:"
                                                 " no such folder")]:
        for extra in [("--max_train_steps", 1), ("--print_memory_plan",)]:
            args = [*model_args(tiny, tmp_path / "out", *extra), "--pretrained_prior_model_name_or_path", str(bad)]
            if bad == repo and extra == ("--print_memory_plan",):
                proc = run_script("train_text_to_image_prior.py", *args, check=False)
                assert proc.returncode == 2 and proc.stderr.strip().splitlines()[0].startswith(expected), proc.stderr
                assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
                continue
            capfd.readouterr()
            with pytest.raises(params.UsageError) as error:
                train_text_to_image_prior.main(args)
            assert f"error: {error.value}".startswith(expected) and "\n" not in str(error.value), error.value
            assert capfd.readouterr().err == ""


def test_a_plan_that_cannot_be_computed_is_one_warning_line(tiny, monkeypatch):
    """Anything else the plan cannot handle is one warning, and the run goes on without a plan."""
    from kandinsky_finetune.tracking import Log

    warnings = []
    log = Log(True)
    monkeypatch.setattr(log, "warn", warnings.append)
    monkeypatch.setattr(memory_plan, "parameters", lambda model: 1 / 0)
    assert memory_plan.report(plan_args(tiny), "prior", False, log) is None
    assert warnings == ["no memory plan: ZeroDivisionError: division by zero"]


def test_models_load_without_a_second_copy_and_equal_from_pretrained(tiny, monkeypatch):
    """A safetensors model is filled tensor by tensor into a lazily built model (from_pretrained is not called),
    with the same weights as from_pretrained and every parameter trainable, as a constructed model has them."""
    from ppdiffusers import PriorTransformer, UNet2DConditionModel, VQModel

    for cls, repo, sub in [(PriorTransformer, tiny.prior, "prior"), (UNet2DConditionModel, tiny.decoder, "unet"),
                           (VQModel, tiny.decoder, "movq")]:
        reference = cls.from_pretrained(repo, subfolder=sub).state_dict()
        with monkeypatch.context() as m:
            m.setattr(cls, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("from_pretrained was called")))
            model = models.load(cls, repo, sub, "--flag")
        state = model.state_dict()
        assert state.keys() == reference.keys()
        assert all(np.array_equal(state[k].numpy(), reference[k].numpy()) for k in state)
        assert not any(p.stop_gradient for p in model.parameters()) and not model.training


def train_watching(script, task, names, tiny, output_dir, monkeypatch, *flags):
    """Run `script` (4 steps of batch 4, validating every epoch) and return what its components namespace `c` held
    under `names`: at each training step, whether each was loaded; at each validation, the models themselves (None
    where released); and `c` at the end."""
    import train_text_to_image_prior as prior_script
    from kandinsky_finetune import validation

    at_steps, at_validation, seen = [], [], {}
    loss, run = task.loss, validation.run

    def spy_loss(c, *a, **k):
        seen["c"] = c
        at_steps.append([getattr(c, n) is not None for n in names])
        return loss(c, *a, **k)

    def spy_validation(pipe, *a, **k):
        at_validation.append([getattr(seen["c"], n) for n in names])
        run(pipe, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(task, "loss", spy_loss)
        m.setattr(validation, "run", spy_validation)
        extra = (["--validation_prompts", "a red picture"] if script is prior_script else
                 ["--validation_prompt", "a red picture", "--num_validation_images", 1, "--center_crop"])
        script.main(model_args(tiny, output_dir, "--max_train_steps", 4, "--train_batch_size", 4,
                               "--validation_epochs", 1, *flags, *extra))
    return at_steps, at_validation, seen["c"]


def test_cached_runs_train_without_the_frozen_encoders_and_validate_with_them(tiny, tmp_path, monkeypatch):
    """--cache_encoder_outputs: after encoding, no step has the CLIP encoders (prior) or the CLIP image encoder and
    MoVQ (decoder) in memory; validation loads what it needs and releases it again."""
    import train_text_to_image_decoder_lora as decoder_lora
    import train_text_to_image_prior as prior_script
    from kandinsky_finetune import decoder, prior

    for script, task, names in [(prior_script, prior, ("image_encoder", "text_encoder")),
                                (decoder_lora, decoder, ("image_encoder", "movq"))]:
        resident, at_validation, c = train_watching(script, task, names, tiny, tmp_path / script.__name__,
                                                    monkeypatch, "--cache_encoder_outputs")
        assert resident == [[False, False]] * 4
        assert at_validation and all(all(m is not None for m in v) for v in at_validation)
        assert [getattr(c, n) for n in names] == [None, None]  # released again after the last one
        images = glob.glob(str(tmp_path / script.__name__ / "validation" / "*" / "*.png"))
        assert images


def test_on_a_gpu_too_small_one_warning_names_the_flags_that_fit(tiny, monkeypatch):
    """The GPU branch, with the device faked: a card smaller than the plan gets one warning naming the cheapest
    flags whose plan fits it; a card whose size cannot be read gets one line and no comparison."""
    from kandinsky_finetune.tracking import Log

    args = plan_args(tiny)
    needed = memory_plan.build(args, "prior", False, device="gpu").peak
    with_cache = memory_plan.build(plan_args(tiny, "--cache_encoder_outputs"), "prior", False, device="gpu").peak
    assert with_cache < needed
    warnings = []
    log = Log(True)
    monkeypatch.setattr(log, "warn", warnings.append)
    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle.device.cuda, "get_device_properties",
                        lambda *a: SimpleNamespace(total_memory=(needed + with_cache) / 2))
    memory_plan.report(args, "prior", False, log)
    assert len(warnings) == 1 and "it would fit with --cache_encoder_outputs (" in warnings[0], warnings

    def unreadable(*a):
        raise RuntimeError("no driver")

    monkeypatch.setattr(paddle.device.cuda, "get_device_properties", unreadable)
    warnings.clear()
    memory_plan.report(args, "prior", False, log)
    assert warnings == ["cannot read the GPU's memory size (RuntimeError); the plan is not compared with it"]


def decoder_plan_args(tiny, *extra, lora=False):
    parser = params.build_parser("test", lora=lora)
    params.add_decoder_args(parser)
    return params.parse(parser, model_args(tiny, "unused", *extra))


def items(plan, phase="training"):
    return {label: size for label, size, _ in plan.phases[phase]}


def test_the_advice_when_every_memory_saving_flag_is_already_set(tiny):
    args = plan_args(tiny, "--cache_encoder_outputs", "--gradient_checkpointing", "--mixed_precision", "fp16",
                     "--train_batch_size", 1)
    needed = memory_plan.build(args, "prior", False).peak
    assert memory_plan.fitting_flags(args, "prior", False, capacity=0) == (
        f"every memory-saving flag is already set ({needed / memory_plan.GB:.1f} GB); "
        "try LoRA (train_text_to_image_prior_lora.py)")


def test_prior_activations_scale_with_the_transformers_width_not_the_embeddings():
    """The real prior's blocks run at 32 heads x 64 = 2048, not at its 1280-dim embeddings."""
    from ppdiffusers import PriorTransformer

    def activations(**config):
        with models.lazy_init():
            prior = PriorTransformer(num_layers=2, num_embeddings=77, additional_embeddings=4, **config)
        return activation_estimates.prior_activations(prior, checkpointing=False)

    real = activations(num_attention_heads=32, attention_head_dim=64, embedding_dim=1280)
    assert real == activations(num_attention_heads=32, attention_head_dim=64, embedding_dim=640)
    assert real > 1.4 * activations(num_attention_heads=32, attention_head_dim=40, embedding_dim=1280)
    assert real >= 2 * 16 * 81 * 2048  # two blocks of 16 tensors of tokens x width


def test_unet_checkpointing_keeps_the_attention_layers_and_the_image_tokens_count():
    """ppdiffusers 0.29 recomputes only the resnets of the Kandinsky UNet's blocks: with --gradient_checkpointing
    the attention probabilities over the pixels and the 32 image tokens (ImageProjection) of every attention layer
    stay in the plan (the real UNet at 512 px)."""
    with models.lazy_init():
        unet = tiny_models.build_model(tiny_models.REAL_SPEC, "unet")
    assert unet.encoder_hid_proj.num_image_text_embeds == 32
    side, head_dim = 64, unet.config["attention_head_dim"]
    probabilities, per_token = 0, 0
    for level, c in enumerate(unet.config["block_out_channels"]):
        hw = (side >> level) ** 2
        attention_layers = {0: 0, 1: 7, 2: 7, 3: 8}[level]  # 3 down + 4 up; the middle block's at the last level
        probabilities += attention_layers * (c // head_dim) * hw * (hw + 32)
        per_token += attention_layers * (c // head_dim) * hw
    planned = activation_estimates.unet_activations(unet, side, checkpointing=True)
    assert planned > probabilities
    unet.encoder_hid_proj.num_image_text_embeds = 10  # the config decides
    assert planned - activation_estimates.unet_activations(unet, side, checkpointing=True) == 22 * per_token


def test_on_a_gpu_the_checkpoint_phase_writes_through_host_memory(tiny):
    """A checkpoint copies the weights to host memory a tensor at a time: on a GPU no second copy of them is
    planned (the checkpoint phase is the training state without gradients and activations); on a CPU one tensor."""
    for processes, extra in [(1, ()), (2, ("--sharding", "stage2"))]:
        plan = memory_plan.build(plan_args(tiny, *extra), "prior", False, device="gpu", processes=processes)
        training, checkpoint = items(plan), items(plan, "checkpoint")
        assert checkpoint["tensor being written"] == 0
        assert plan.total("checkpoint") == plan.total("training") - training["gradients"] - training["activations"] \
            - training["next batch's encoding"]
    on_cpu = items(memory_plan.build(plan_args(tiny), "prior", False, device="cpu"), "checkpoint")
    largest = max(p.size for p in models.lazy_model(
        __import__("ppdiffusers").PriorTransformer, tiny.prior, "prior").parameters())
    assert on_cpu["tensor being written"] == 4 * largest


def test_plan_keeps_the_decoders_encoders_with_random_crop_and_reads_no_batch_ahead_with_workers(tiny):
    """--random_crop of non-square images trains the decoder without its cache (decoder.cached_dataset): the plan
    keeps the encoders then. With --dataloader_num_workers the prior scripts do not encode the next batch during
    the step (data.Loader reads ahead only without workers)."""
    cached = items(memory_plan.build(decoder_plan_args(tiny, "--cache_encoder_outputs"), "decoder", False))
    cropped = items(memory_plan.build(decoder_plan_args(tiny, "--cache_encoder_outputs", "--random_crop"),
                                      "decoder", False))
    uncached = items(memory_plan.build(decoder_plan_args(tiny), "decoder", False))
    assert cached["frozen encoders"] == 0 and cropped["frozen encoders"] == uncached["frozen encoders"] > 0
    assert items(memory_plan.build(plan_args(tiny), "prior", False))["next batch's encoding"] > 0
    assert items(memory_plan.build(plan_args(tiny, "--dataloader_num_workers", 1), "prior", False))[
        "next batch's encoding"] == 0


def test_cached_runs_load_the_trained_model_after_the_encoders_are_released(tiny, tmp_path, monkeypatch):
    """--cache_encoder_outputs: the encoders run and leave memory before the prior / UNet loads (so the run peaks at
    the larger of the two phases, not at their sum), and the plan's encoding phase holds the encoders alone."""
    import train_text_to_image_decoder as decoder_script
    import train_text_to_image_prior_lora as prior_lora
    from kandinsky_finetune import decoder, prior

    for script, task, trained, extra in [(prior_lora, prior, "prior", []),
                                         (decoder_script, decoder, "unet", ["--center_crop"])]:
        seen, encode = [], task.encode

        def spy(c, *a, **k):  # the encoders' forward pass, while the cache is written
            seen.append(getattr(c, trained, None))
            return encode(c, *a, **k)

        with monkeypatch.context() as m:
            m.setattr(task, "encode", spy)
            # a datasets cache of its own: a cache another test wrote would be reused without running the encoders
            script.main(model_args(tiny, tmp_path / script.__name__, "--max_train_steps", 1, "--cache_encoder_outputs",
                                   "--cache_dir", tmp_path / "hf", *extra))
        assert seen and all(model is None for model in seen), seen
    for kind, lora, make in [("prior", True, plan_args), ("decoder", False, decoder_plan_args)]:
        plan = memory_plan.build(make(tiny, "--cache_encoder_outputs", lora=lora), kind, lora)
        assert set(items(plan, "encoding")) == {"frozen encoders", "runtime"}


def test_validation_loads_its_models_frozen_and_releases_them_after_each_validation(tiny, tmp_path, monkeypatch):
    """Without --cache_encoder_outputs too: the models only validation uses (the decoder's UNet and MoVQ for the
    prior, the prior and its text encoder for the decoder) are loaded as frozen models for each validation and are
    not in memory while training steps run."""
    import train_text_to_image_decoder_lora as decoder_lora
    import train_text_to_image_prior as prior_script
    from kandinsky_finetune import decoder, prior

    for script, task, names in [(prior_script, prior, ("decoder_unet", "decoder_movq")),
                                (decoder_lora, decoder, ("prior_prior", "prior_text_encoder"))]:
        at_steps, at_validation, _ = train_watching(script, task, names, tiny, tmp_path / script.__name__, monkeypatch)
        assert len(at_steps) == 4 and not any(any(step) for step in at_steps), at_steps
        frozen = [not m.training and all(p.stop_gradient for p in m.parameters()) for v in at_validation for m in v]
        assert len(frozen) >= 4 and all(frozen)


def test_print_memory_plan_usage_reads_as_the_readme_says():
    usage = " ".join(params.build_parser("test").format_help().split())
    assert "--print_memory_plan [gpu|cpu]" in usage
    for readme in ("README.md", "README_EN.md"):
        with open(os.path.join(os.path.dirname(__file__), "..", readme), encoding="utf-8") as f:
            assert "| `--print_memory_plan [gpu\\|cpu]` |" in f.read()
