"""Activation memory of one training step, measured, against the memory plan's estimate of it.

    python benchmarks/activations.py [--configs prior-b4 unet-b1-256-ckpt ...] [--layers 1]

Builds the prior and the UNet at the true widths of Kandinsky 2.2 (the prior: 32 heads x 64, 1280-dim embeddings, 77 + 4
tokens; the UNet: channels 384/768/1152, attention heads of 64, 32 image tokens, the Kandinsky block types) with fewer
layers (`--layers` per block or transformer; the UNet without its 1536-channel level), random weights, no files.
Each configuration runs in a fresh process: one forward and backward through the scripts' own loss (prior.loss,
decoder.loss) to allocate the gradients, then a second one, measured: the peak of Paddle's host allocator during it
minus what was allocated before it (weights, gradients, inputs) is the activation memory. The plan's figure is
activation_estimates.prior_activations / unet_activations on the same model and configuration. GB = 1e9 bytes, fp32.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (model, batch, resolution in px (the UNet's latent side is 1/8 of it), gradient checkpointing)
CONFIGS = {f"{model}-b{batch}{f'-{px}' if px else ''}{'-ckpt' if ckpt else ''}": (model, batch, px, ckpt)
           for model, sizes in [("prior", [(4, None), (16, None)]), ("unet", [(1, 256), (2, 256), (1, 512), (2, 512)])]
           for batch, px in sizes for ckpt in (False, True)}
MOVQ_FACTOR = 8  # the real MoVQ's downscale factor (4 levels)


def spec(layers, size="real"):
    """The real architectures' configs, `layers` deep; the UNet without its deepest (1536-channel) level, so that its
    weights and gradients (2.9 GB at one layer per block) leave room for the activations in a few GB. `size` "tiny":
    the tests' tiny models instead (the same code path in seconds)."""
    from kandinsky_finetune import tiny_models

    if size == "tiny":
        s = tiny_models.tiny_spec(prior_layers=layers)
        s["unet"]["layers_per_block"] = layers
        return s
    s = copy.deepcopy(tiny_models.REAL_SPEC)
    s["prior"]["num_layers"] = layers
    unet = s["unet"]
    unet.update(layers_per_block=layers, block_out_channels=unet["block_out_channels"][:3],
                down_block_types=unet["down_block_types"][:3], up_block_types=unet["up_block_types"][1:])
    return s


def build(name, layers, size, lazy=False):
    from kandinsky_finetune import models, tiny_models

    with models.lazy_init() if lazy else contextlib.nullcontext():
        return tiny_models.build_model(spec(layers, size), name)


def planned(model_name, batch, px, checkpointing, layers, size="real"):
    """The plan's activation bytes (fp32) for the configuration."""
    from kandinsky_finetune import activation_estimates

    model = build(model_name, layers, size, lazy=True)
    if model_name == "prior":
        return 4 * batch * activation_estimates.prior_activations(model, checkpointing)
    return 4 * batch * activation_estimates.unet_activations(model, px // MOVQ_FACTOR, checkpointing)


def measure(model_name, batch, px, checkpointing, layers, size="real"):
    """Bytes allocated at the peak of a training step's forward and backward beyond what was allocated before it."""
    from types import SimpleNamespace

    import numpy as np
    import paddle
    from paddle.base import core
    from ppdiffusers import DDPMScheduler

    from kandinsky_finetune import decoder, models, prior

    paddle.seed(0)
    model = build(model_name, layers, size)
    model.train()
    precision = SimpleNamespace(enabled=False, autocast=contextlib.nullcontext)  # fp32, as on a CPU
    models.skip_fp32_upcasts(precision, model)  # as the scripts run it
    rng = np.random.default_rng(0)
    t = lambda *shape: paddle.to_tensor(rng.standard_normal(shape, dtype="float32"))  # noqa: E731
    timesteps = paddle.to_tensor(rng.integers(1000, size=batch))
    if model_name == "prior":
        if checkpointing:
            models.enable_prior_gradient_checkpointing(model)
        width, tokens = model.config.embedding_dim, model.config.num_embeddings
        batch_inputs = {"noisy_embeds": t(batch, width), "timesteps": timesteps, "target": t(batch, width),
                        "text_embeds": t(batch, width), "text_hidden": t(batch, tokens, width),
                        "text_mask": paddle.ones([batch, tokens], dtype="bool")}
        c = SimpleNamespace(noise_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"))
        step = lambda: prior.loss(c, model, batch_inputs, None, precision)  # noqa: E731
    else:
        if checkpointing:
            model.enable_gradient_checkpointing()
        side = px // MOVQ_FACTOR
        batch_inputs = {"noisy_latents": t(batch, 4, side, side), "timesteps": timesteps,
                        "target": t(batch, 4, side, side), "image_embeds": t(batch, model.config.encoder_hid_dim)}
        c = SimpleNamespace(noise_scheduler=DDPMScheduler())
        step = lambda: decoder.loss(c, model, batch_inputs, None, precision)  # noqa: E731
    step().backward()  # a first step: what it allocates once (workspaces, caches) is allocated before the measured one
    for p in model.parameters():
        p.clear_gradient(set_to_zero=False)  # freed, as the training loop frees them after each optimizer step
    before = core.host_memory_stat_current_value("Allocated", 0)
    # The weights' gradients appear during the backward pass; the plan counts them whole in their own line. So the
    # allocator is read each time a gradient arrives, less the gradients that have arrived by then
    arrived, samples = [0], [0]

    def sample(grad, size):
        arrived[0] += size
        samples.append(core.host_memory_stat_current_value("Allocated", 0) - before - arrived[0])
        return grad

    hooks = [p.register_hook(lambda grad, size=p.size * p.element_size(): sample(grad, size))
             for p in model.parameters() if not p.stop_gradient]
    core.host_memory_stat_reset_peak_value("Allocated", 0)
    start = time.time()
    loss = step()
    forward = core.host_memory_stat_peak_value("Allocated", 0) - before  # the forward pass's peak
    kept = core.host_memory_stat_current_value("Allocated", 0) - before  # what it keeps for the backward pass
    loss.backward()
    for hook in hooks:
        hook.remove()
    return {"bytes": max(forward, *samples), "forward": forward, "backward": max(samples), "kept": kept,
            "seconds": time.time() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=1, help="Transformer blocks of the prior, layers per UNet block.")
    parser.add_argument("--size", default="real", choices=["real", "tiny"],
                        help="tiny: the tests' tiny models (checks the code path, measures nothing of interest)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: measure this config
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*CONFIGS[args.one], args.layers, args.size)), flush=True)
        return
    import paddle

    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"Paddle {paddle.__version__}, {time.strftime('%Y-%m-%d')}, --layers {args.layers} --size {args.size}\n")
    print("| config | measured | plan | plan / measured |\n|---|---|---|---|")
    worst = 1.0
    for name in args.configs:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, "--layers", str(args.layers),
                               "--size", args.size], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])["bytes"]
        plan = planned(*CONFIGS[name], args.layers, args.size)
        ratio = plan / measured
        worst = max(worst, ratio, 1 / ratio)
        print(f"| {name} | {measured / 1e9:.3g} GB | {plan / 1e9:.3g} GB | {ratio:.2f} |", flush=True)
    print(f"\nworst plan / measured (or its inverse): {worst:.2f}")


if __name__ == "__main__":
    main()
