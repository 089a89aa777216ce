"""Validation images: generated with the weights being trained, saved as PNG and sent to the tracker."""
import os

import paddle


def generate(pipe, prompts, num_images_per_prompt, resolution, seed, output_dir, step, tracker):
    """Run `pipe` on each prompt with a fixed generator; write output_dir/validation/step-<N>/<k>.png."""
    pipe.set_progress_bar_config(disable=True)
    generator = paddle.Generator().manual_seed(seed)
    images = []
    with paddle.no_grad():
        for prompt in prompts:
            images += pipe(prompt, num_images_per_prompt=num_images_per_prompt, height=resolution, width=resolution,
                           generator=generator).images
    folder = os.path.join(output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        image.save(os.path.join(folder, f"{k}.png"))
    tracker.images("validation", images, step)
    return folder


def is_due(epoch, every):
    """Validation runs after epochs 0, every, 2*every, ... (counting from 0)."""
    return epoch % every == 0
