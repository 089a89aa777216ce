"""Validation images: generated with the weights being trained, saved as PNG (each image, and one grid of the round)
and sent to the tracker."""
import os
import warnings

import paddle

GRID = "grid.png"  # the round's images in one picture, beside them


def generate(pipe, prompts, num_images_per_prompt, resolution, steps, seed, output_dir, step, tracker):
    """Run `pipe` (a KandinskyV22CombinedPipeline) on each prompt with a fixed generator, `steps` denoising steps in
    both its prior and its decoder; write output_dir/validation/step-<N>/<k>.png and the round's grid.png."""
    pipe.set_progress_bar_config(disable=True)
    generator = paddle.Generator().manual_seed(seed)
    images = []
    with paddle.no_grad(), warnings.catch_warnings():
        # the combined pipeline passes its own deprecated `callback_steps` on to the decoder pipeline: not the user's
        warnings.filterwarnings("ignore", message="`callback_steps` is deprecated", category=FutureWarning)
        for prompt in prompts:
            images += pipe(prompt, num_images_per_prompt=num_images_per_prompt, height=resolution, width=resolution,
                           num_inference_steps=steps, prior_num_inference_steps=steps, generator=generator).images
    folder = step_folder(output_dir, step)
    if paddle.distributed.get_rank() != 0:  # (--sharding stage3: every rank generates together, rank 0 writes)
        return folder
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        image.save(os.path.join(folder, f"{k}.png"))
    picture = grid(images, prompts, num_images_per_prompt)
    picture.save(os.path.join(folder, GRID))
    tracker.images("validation", images, step)
    tracker.image("validation_grid", picture, step)
    return folder


def step_folder(output_dir, step):
    return os.path.join(output_dir, "validation", f"step-{step}")


def grid(images, prompts, per_prompt):
    """One picture of a validation round, to see a run's progress at a glance: a row per prompt, its images side by
    side under the prompt's text (cut to the row's width)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = images[0].size
    font = ImageFont.load_default()
    caption = font.getbbox("Ag")[3] + 4
    picture = Image.new("RGB", (per_prompt * width, len(prompts) * (caption + height)), "white")
    draw = ImageDraw.Draw(picture)
    for row, prompt in enumerate(prompts):
        top = row * (caption + height)
        draw.text((2, top + 2), fitted(prompt, lambda t: draw.textlength(t, font=font) <= picture.width - 4),
                  fill="black", font=font)
        for col in range(per_prompt):
            picture.paste(images[row * per_prompt + col].convert("RGB"), (col * width, top + caption))
    return picture


def fitted(text, fits):
    """`text`, or as much of it as `fits` followed by "...", or "" where not even that fits."""
    if fits(text):
        return text
    while text and not fits(text + "..."):
        text = text[:-1]
    return text + "..." if text else ""


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
