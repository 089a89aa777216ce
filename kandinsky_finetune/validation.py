"""Validation images: generated with the weights being trained, saved as PNG and sent to the tracker."""
import os
import warnings

import paddle


def generate(pipe, prompts, num_images_per_prompt, resolution, steps, seed, output_dir, step, tracker):
    """Run `pipe` (a KandinskyV22CombinedPipeline) on each prompt with a fixed generator, `steps` denoising steps in
    both its prior and its decoder; write output_dir/validation/step-<N>/<k>.png."""
    pipe.set_progress_bar_config(disable=True)
    generator = paddle.Generator().manual_seed(seed)
    images = []
    with paddle.no_grad(), warnings.catch_warnings():
        # the combined pipeline passes its own deprecated `callback_steps` on to the decoder pipeline: not the user's
        warnings.filterwarnings("ignore", message="`callback_steps` is deprecated", category=FutureWarning)
        for prompt in prompts:
            images += pipe(prompt, num_images_per_prompt=num_images_per_prompt, height=resolution, width=resolution,
                           num_inference_steps=steps, prior_num_inference_steps=steps, generator=generator).images
    folder = os.path.join(output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        image.save(os.path.join(folder, f"{k}.png"))
    tracker.images("validation", images, step)
    return folder


def prompts(args):
    """--validation_prompts (full scripts, several) or --validation_prompt (LoRA scripts, one); [] if none."""
    many = getattr(args, "validation_prompts", None)
    one = getattr(args, "validation_prompt", None)
    return list(many) if many else [one] if one else []


def run(pipe, trained_models, args, seed, step, tracker, log):
    """Validation with `pipe`, the `trained_models` in it switched to eval mode for the while."""
    for m in trained_models:
        m.eval()
    try:
        folder = generate(pipe, prompts(args), getattr(args, "num_validation_images", 1), args.resolution,
                          args.num_inference_steps, seed, args.output_dir, step, tracker)
    finally:
        for m in trained_models:
            m.train()
    log(f"validation images: {folder}")
