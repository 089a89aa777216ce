"""Validation images: generated with the weights being trained, saved as PNG (each image, and one grid of the round)
and sent to the tracker."""
import functools
import os
import warnings

import paddle

GRID = "grid.png"  # the round's images in one picture, beside them
# Where the grid looks for a font when Pillow's own lacks a prompt's characters (it has no Chinese, say): the usual
# font folders of Linux, macOS and Windows, fonts known to cover Chinese tried first.
FONT_FOLDERS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts",
                "/System/Library/Fonts", "/Library/Fonts", "C:/Windows/Fonts")
CJK_FONTS = ("cjk", "wqy", "droidsansfallback", "sourcehan", "notosanssc", "msyh", "simhei", "simsun", "pingfang")
FONT_SIZE = 12


def generate(pipe, prompts, num_images_per_prompt, sizes, steps, seed, output_dir, step, tracker):
    """Run `pipe` (a KandinskyV22CombinedPipeline) on each prompt with a fixed generator, `steps` denoising steps in
    both its prior and its decoder, at each (width, height) of `sizes`; write output_dir/validation/step-<N>/<k>.png
    and the round's grid.png for the first size, <W>x<H>-<k>.png and grid-<W>x<H>.png for any other."""
    pipe.set_progress_bar_config(disable=True)
    generator = paddle.Generator().manual_seed(seed)
    rounds = []
    with paddle.no_grad(), warnings.catch_warnings():
        # the combined pipeline passes its own deprecated `callback_steps` on to the decoder pipeline: not the user's
        warnings.filterwarnings("ignore", message="`callback_steps` is deprecated", category=FutureWarning)
        for width, height in sizes:
            rounds.append([image for prompt in prompts for image in pipe(
                prompt, num_images_per_prompt=num_images_per_prompt, height=height, width=width,
                num_inference_steps=steps, prior_num_inference_steps=steps, generator=generator).images])
    folder = step_folder(output_dir, step)
    if paddle.distributed.get_rank() != 0:  # (--sharding stage3: every rank generates together, rank 0 writes)
        return folder
    os.makedirs(folder, exist_ok=True)
    for n, ((width, height), images) in enumerate(zip(sizes, rounds)):
        prefix, suffix = ("", "") if n == 0 else (f"{width}x{height}-", f"_{width}x{height}")
        for k, image in enumerate(images):
            image.save(os.path.join(folder, f"{prefix}{k}.png"))
        picture = grid(images, prompts, num_images_per_prompt)
        picture.save(os.path.join(folder, GRID if n == 0 else f"grid-{width}x{height}.png"))
        tracker.images("validation" + suffix, images, step)
        tracker.image("validation_grid" + suffix, picture, step)
    return folder


def step_folder(output_dir, step):
    return os.path.join(output_dir, "validation", f"step-{step}")


def grid(images, prompts, per_prompt, font_folders=FONT_FOLDERS):
    """One picture of a validation round, to see a run's progress at a glance: a row per prompt, its images side by
    side under the prompt's text (cut to the row's width), or "row <k>" where no font found has its characters (the
    model card lists the rows' prompts)."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    font = caption_font(tuple(prompts), tuple(font_folders))
    texts = [prompt if has_glyphs(font, prompt) else f"row {k}" for k, prompt in enumerate(prompts, 1)]
    caption = max(font.getbbox(text)[3] for text in ["Ag", *texts]) + 4
    picture = Image.new("RGB", (per_prompt * width, len(prompts) * (caption + height)), "white")
    draw = ImageDraw.Draw(picture)
    for row, text in enumerate(texts):
        top = row * (caption + height)
        draw.text((2, top + 2), fitted(text, lambda t: draw.textlength(t, font=font) <= picture.width - 4),
                  fill="black", font=font)
        for col in range(per_prompt):
            picture.paste(images[row * per_prompt + col].convert("RGB"), (col * width, top + caption))
    return picture


@functools.lru_cache(maxsize=8)  # (every round of a run draws the same prompts)
def caption_font(texts, folders):
    """Pillow's default font if it has every character of `texts`, else the first font file under `folders` that has
    them all, else the default."""
    from PIL import ImageFont

    default = ImageFont.load_default()
    if all(has_glyphs(default, text) for text in texts):
        return default
    for path in font_files(folders):
        try:
            font = ImageFont.truetype(path, FONT_SIZE)
        except OSError:
            continue
        if all(has_glyphs(font, text) for text in texts):
            return font
    return default


def font_files(folders):
    files = [os.path.join(root, name) for folder in folders for root, _, names in os.walk(os.path.expanduser(folder))
             for name in names if name.lower().endswith((".ttf", ".otf", ".ttc"))]
    key = lambda path: os.path.basename(path).lower().replace("-", "").replace(" ", "")  # noqa: E731
    return sorted(files, key=lambda path: (not any(hint in key(path) for hint in CJK_FONTS), path))


def has_glyphs(font, text):
    """Whether `font` draws every character of `text`: one it lacks comes out as the font's "missing" box, the
    shape it gives a code point no font has."""
    from PIL import ImageFont

    if not isinstance(font, ImageFont.FreeTypeFont):  # (Pillow's bitmap font, without FreeType)
        return text.isascii()

    def shape(character):
        mask = font.getmask(character)
        return mask.size, bytes(mask)

    missing = shape("\U0010ffff")
    return all(c.isspace() or shape(c) != missing for c in set(text))


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


def run(pipe, trained_models, args, seed, step, tracker, log, sizes=None):
    """Validation with `pipe`, the `trained_models` in it switched to eval mode for the while, at each (width, height)
    of `sizes` (default: the --resolution square)."""
    for m in trained_models:
        m.eval()
    try:
        folder = generate(pipe, prompts(args), getattr(args, "num_validation_images", 1),
                          sizes or [(args.resolution, args.resolution)], args.num_inference_steps, seed,
                          args.output_dir, step, tracker)
    finally:
        for m in trained_models:
            m.train()
    log(f"validation images: {folder}")


def if_due(loop, epoch, validate):
    """`validate(step)` after epochs 0, every, 2*every, ... (counting from 0) of the training loop (training.Loop), on
    rank 0 while the others wait, when there is a prompt; the end of training validates in final_save. With --sharding
    stage3 every rank validates alike (the trained model's layers gather their slices from every rank); rank 0 writes
    the images."""
    from .distributed import on_rank_0
    from .sharding import is_stage3

    if prompts(loop.args) and epoch % loop.args.validation_epochs == 0 and not loop.done:
        if is_stage3(loop.model):
            in_loop(loop, validate)
        else:
            on_rank_0(f"validating at step {loop.global_step}", lambda: in_loop(loop, validate), loop.ctx)


def in_loop(loop, validate):
    """`validate(step)` between the loop's steps, the loader's read-ahead paused."""
    from .faults import injected_delay

    # autocast entered in the thread that validates (it is per thread): frozen parts may be in half precision
    with loop.paused(), loop.clock.phase("validation"), loop.precision.autocast():
        injected_delay("validation")
        validate(loop.global_step)
