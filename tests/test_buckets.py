"""--enable_bucket (decoder scripts): the bucket sizes, each image's bucket, batches of one bucket shared out like
the square batches (resume, ranks, accumulation), the bucket crop given to both encoders, and a decoder fine-tuned
on 16:9, 1:1 and 2:3 photos that generates at each of their sizes; bad bucket flags are one line."""
import json
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, model_args, run, run_script, state_dict_of
from kandinsky_finetune import buckets, decoder
from kandinsky_finetune.data import clip_input, crop_size, draw_view, to_movq_input, resize
from kandinsky_finetune.loader import sample_rng
from kandinsky_finetune.params import UsageError

DECODER = "train_text_to_image_decoder.py"
# the tiny MoVQ's factor is 8, as the real one's, so the grid is 64 px: buckets 320x192 (16:9), 256x256, 192x320 (2:3)
BUCKETS = ["--enable_bucket", "--resolution", 256, "--min_bucket_reso", 64, "--max_bucket_reso", 384]
PHOTOS = {"wide": ((384, 216), 3), "square": ((200, 200), 2), "tall": ((200, 300), 2)}  # 16:9, 1:1, 2:3


def bucket_args(**changes):
    values = dict(resolution=512, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64,
                  bucket_no_upscale=False)
    return SimpleNamespace(**{**values, **changes})


def test_buckets_are_the_largest_on_the_grid_for_each_aspect_ratio():
    args = bucket_args()
    sizes = buckets.sizes(args)
    assert (512, 512) in sizes and buckets.largest(args) == (512, 512)
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 and w * h <= 512 ** 2
        assert (h, w) in sizes
        assert h == 1024 or w * (h + 64) > 512 ** 2 or (w, h + 64) in sizes  # nothing taller fits this width...
    # ... except where the turned pair made it: every width's tallest height is there
    for w in range(256, 1025, 64):
        tallest = min(1024, 512 ** 2 // w // 64 * 64)
        assert tallest < 256 or (w, tallest) in sizes
    # nearest aspect ratio on a log scale; the larger bucket on a tie
    assert buckets.bucket_of((1920, 1080), args) == (640, 384)
    assert buckets.bucket_of((1000, 1000), args) == (512, 512)
    assert buckets.bucket_of((400, 600), args) == (384, 640)
    assert buckets.bucket_of((5000, 100), args) == (1024, 256)
    for size in (1920, 1080), (400, 600), (333, 777):
        aspect = np.log(size[0] / size[1])
        best = min(abs(np.log(w / h) - aspect) for w, h in sizes)
        w, h = buckets.bucket_of(size, args)
        assert abs(np.log(w / h) - aspect) == best


def test_no_upscale_keeps_each_image_at_most_its_own_size():
    args = bucket_args(bucket_no_upscale=True)
    assert buckets.bucket_of((300, 300), args) == (256, 256)
    assert buckets.bucket_of((400, 600), args) == (384, 576)
    assert buckets.bucket_of((1920, 1080), args) == (640, 384)  # shrunk to 512^2 first: 682x384, then the grid
    for size in (300, 300), (400, 600), (1920, 1080), (2000, 900):
        w, h = buckets.bucket_of(size, args)
        assert w <= size[0] and h <= size[1] and w * h <= 512 ** 2 and max(w, h) <= 1024
    with pytest.raises(UsageError, match=r"^image b\.png is 200x900 px: with --bucket_no_upscale its bucket would be "
                                         r"192x896, below --min_bucket_reso 256"):
        buckets.assign([(300, 300), (200, 900)], args, names=lambda row: "ab"[row] + ".png")


@pytest.mark.parametrize("changes,message", [
    (dict(resolution=500), "--resolution 500 is not a multiple of --bucket_reso_steps 64; try 448"),
    (dict(min_bucket_reso=512, max_bucket_reso=256), "--min_bucket_reso 512 is larger than --max_bucket_reso 256"),
    (dict(min_bucket_reso=200), "--min_bucket_reso 200 is not a multiple of --bucket_reso_steps 64; try 192"),
    (dict(bucket_reso_steps=32), "--bucket_reso_steps 32 is not a multiple of 64, the size grid the decoder generates"),
    (dict(resolution=128, min_bucket_reso=256), "no bucket between --min_bucket_reso 256 and --max_bucket_reso 1024"),
])
def test_bad_bucket_flags_are_one_line(changes, message):
    with pytest.raises(UsageError) as e:
        buckets.check_args(bucket_args(**changes), grid=buckets.grid_of(8, 4))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bucket_flags_are_decoder_flags_and_need_enable_bucket(tmp_path):
    import train_text_to_image_decoder_lora
    import train_text_to_image_prior
    import train_text_to_image_prior_lora

    data = ["--train_data_dir", str(tmp_path)]
    args = train_text_to_image_decoder_lora.parse_args([*data, "--enable_bucket"])
    assert (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) == (256, 1024, 64)
    with pytest.raises(UsageError, match=r"^--max_bucket_reso, --bucket_no_upscale are for --enable_bucket; add it"):
        train_text_to_image_decoder_lora.parse_args([*data, "--max_bucket_reso", "512", "--bucket_no_upscale"])
    for script in train_text_to_image_prior, train_text_to_image_prior_lora:  # the prior sees CLIP's square only
        with pytest.raises(SystemExit) as e:
            script.parse_args([*data, "--enable_bucket"])
        assert e.value.code == 2


def test_every_batch_is_one_bucket_and_ranks_share_each_global_batch():
    shapes = [(160, 96)] * 5 + [(128, 128)] * 3 + [(96, 160)] * 2
    one = buckets.BucketBatchSampler(shapes, 2, 0, 1, seed=7)
    ranks = [buckets.BucketBatchSampler(shapes, 1, r, 2, seed=7) for r in (0, 1)]
    assert len(one) == one.batches_per_epoch == 3 + 2 + 1 == len(ranks[0]) == len(ranks[1])
    for epoch in 0, 1:
        for sampler in one, *ranks:
            sampler.set_epoch(epoch)
        batches = list(one)
        assert all(len(b) == 2 and len({shapes[row] for _, row in b}) == 1 for b in batches)  # full, one bucket
        assert {row for b in batches for _, row in b} == set(range(10))  # every image, each epoch
        # two ranks with batches of 1 take the halves of the one-process batches of 2, step by step
        assert [a + b for a, b in zip(*ranks)] == batches
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # shuffled again each epoch...
    one.set_epoch(0, skip_batches=2)
    assert list(one) == first[2:]  # ... but the same for the same (seed, epoch): a resumed epoch continues


def test_both_encoders_get_the_bucket_crop(tiny):
    """MoVQ gets the bucket crop resized to the bucket, the CLIP image processor the same crop at full quality; the
    noise has the bucket's latent shape; --random_crop and --random_flip move and mirror it."""
    from test_data import fake_components

    c = fake_components(tiny)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8))
    shape = (96, 32)  # 3:1, cropped from a 2.2:1 image: the full width is not kept
    args = SimpleNamespace(image_column="image", resolution=64, random_crop=True, random_flip=True, noise_offset=0.0)
    make = decoder.sample_maker(args, c, shapes=[shape])
    views = set()
    for seed in range(6):
        view = draw_view(sample_rng(seed, 0, 0), image.size, center=False, flip=True, shape=shape)
        views.add(view)
        sample = make({"image": image}, sample_rng(seed, 0, 0), 0)
        left, top, width, height, flipped = view
        assert (width, height) == crop_size(image.size, shape) == (200, 67)
        crop = image.crop((left, top, left + width, top + height))
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flipped else crop
        np.testing.assert_array_equal(sample["pixel_values"], to_movq_input(resize(crop, shape)))
        assert sample["pixel_values"].shape == (3, 32, 96) and sample["noise"].shape == (4, 4, 12)
        np.testing.assert_array_equal(sample["clip_pixel_values"], clip_input(c.image_processor, crop))
    assert len({v[1] for v in views}) > 1 and {v[4] for v in views} == {False, True}


def test_memory_plan_counts_the_largest_bucket(tiny):
    """Activations grow with the pixels: the plan counts the bucket of the largest area, here 192x192 (every side at
    most --max_bucket_reso 192), whatever --resolution's square would be."""
    import train_text_to_image_decoder

    from kandinsky_finetune import memory_plan

    def planned(*flags):
        args = train_text_to_image_decoder.parse_args(model_args(tiny, "unused", *flags))
        plan = memory_plan.build(args, "decoder", lora=False, device="cpu")
        return plan, dict((label, size) for label, size, _ in plan.phases["training"])["activations"]

    bucketed, activations = planned(*BUCKETS, "--max_bucket_reso", 192)
    assert "largest bucket 192x192 px" in bucketed.title
    assert activations == planned("--resolution", 192)[1] < planned("--resolution", 256)[1]


def write_photos(folder):
    """An imagefolder of 16:9, 1:1 and 2:3 pictures (PHOTOS), coloured by shape, with captions."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for k, (name, ((w, h), count)) in enumerate(PHOTOS.items()):
            for i in range(count):
                array = np.zeros((h, w, 3), np.uint8)
                array[..., k] = 200
                array[rng.integers(h):, :rng.integers(w)] = 255
                Image.fromarray(array).save(os.path.join(folder, f"{name}{i}.png"))
                f.write(json.dumps({"file_name": f"{name}{i}.png", "text": f"a {name} picture"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def photos_run(tiny, tmp_path_factory):
    """The full decoder fine-tuned with buckets on 3 + 2 + 2 photos: batch 2, 2 micro-batches per step (4 batches
    per epoch, so a step's micro-batches may come from two buckets), a checkpoint every step, a validation."""
    root = tmp_path_factory.mktemp("buckets")
    data = write_photos(str(root / "photos"))
    flags = [*BUCKETS, "--train_data_dir", data, "--train_batch_size", 2, "--gradient_accumulation_steps", 2,
             "--max_train_steps", 3, "--checkpointing_steps", 1, "--lr_warmup_steps", 0, "--random_flip",
             # Adam's update made linear in the gradient (test_accumulation.py), so float noise in a near-zero
             # gradient is not blown up to a full step; no clipping either
             "--learning_rate", 100, "--adam_epsilon", 100, "--max_grad_norm", 0]
    out = root / "out"
    proc = run_script(DECODER, *model_args(tiny, out, *flags, "--validation_prompts", "a wide picture",
                                           "--num_inference_steps", 2))
    return SimpleNamespace(root=root, out=out, flags=flags, stderr=proc.stderr)


def test_decoder_trained_with_buckets_generates_at_each_size(tiny, photos_run):
    from ppdiffusers import KandinskyV22CombinedPipeline

    table = photos_run.stderr[photos_run.stderr.index("3 aspect-ratio buckets"):].splitlines()[1:4]
    assert [line.split()[:3] + line.split()[-2:] for line in table] == [
        ["320", "x", "192", "3", "images"], ["192", "x", "320", "2", "images"], ["256", "x", "256", "2", "images"]]
    # validation at the --resolution square and at the size most images trained at
    step = photos_run.out / "validation" / "step-3"
    assert Image.open(step / "0.png").size == (256, 256) and Image.open(step / "320x192-0.png").size == (320, 192)
    assert (step / "grid.png").is_file() and (step / "grid-320x192.png").is_file()
    card = (photos_run.out / "README.md").read_text()
    assert "| aspect-ratio buckets | --enable_bucket: sides 64-384 px in steps of 64, area at most 256^2 |" in card
    pipe = KandinskyV22CombinedPipeline.from_pretrained(str(photos_run.out))
    pipe.set_progress_bar_config(disable=True)
    for width, height in (320, 192), (256, 256), (192, 320):
        image = pipe("a wide picture", height=height, width=width, num_inference_steps=2,
                     prior_num_inference_steps=2).images[0]
        assert image.size == (width, height)


def test_resume_with_buckets_continues_mid_epoch(tiny, tmp_path, photos_run):
    """Stopped after step 1 (mid-epoch: 4 batches per epoch, 2 per step), resumed: the uninterrupted weights. (The
    resumed run has no --validation_prompts: other flags must not rename the parameters its optimizer state is keyed
    by, which a memory plan counting validation's models did.)"""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(photos_run.out / "checkpoint-1", resumed / "checkpoint-1")
    proc = run_script(DECODER, *model_args(tiny, resumed, *photos_run.flags, "--resume_from_checkpoint", "latest"))
    assert "at step 1" in proc.stderr
    a, b = state_dict_of(photos_run.out / "unet"), state_dict_of(resumed / "unet")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_two_processes_with_cached_buckets_train_like_one(tiny, tmp_path, photos_run):
    """2 processes with batches of 1 take the halves of each one-process batch of 2 (the same bucket), the encoders'
    outputs read from the cache, written at each image's bucket size: the one-process, uncached weights."""
    out = tmp_path / "two"
    flags = [*photos_run.flags, "--train_batch_size", 1, "--cache_encoder_outputs"]  # (the later value wins)
    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(tmp_path / "log"), str(ROOT / DECODER), *model_args(tiny, out, *flags, "--cache_dir", tmp_path / "hf")],
               cwd=tmp_path, check=False)
    logs = "".join((tmp_path / "log" / f"workerlog.{r}").read_text()[-3000:] for r in (0, 1)
                   if (tmp_path / "log" / f"workerlog.{r}").is_file())
    assert proc.returncode == 0, proc.stdout[-2000:] + logs
    assert "encoder-output cache: encoded" in logs
    a, b = state_dict_of(photos_run.out / "unet"), state_dict_of(out / "unet")
    moved = max(float(np.abs(a[k] - state_dict_of(f"{tiny.decoder}/unet")[k]).max()) for k in a)
    difference = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert difference < 1e-3 * moved, f"weights differ by {difference} (training moved them {moved})"


def test_lora_decoder_trains_with_buckets(tiny, tmp_path):
    """The LoRA decoder script takes the same flags: the same table, a step from each bucket size, its card says so."""
    out = tmp_path / "lora"
    proc = run_script("train_text_to_image_decoder_lora.py", *model_args(
        tiny, out, *BUCKETS, "--train_data_dir", write_photos(str(tmp_path / "photos")), "--train_batch_size", 2,
        "--max_train_steps", 4, "--checkpointing_steps", 100))
    assert "3 aspect-ratio buckets (width x height: images):\n    320 x 192" in proc.stderr
    assert (out / "paddle_lora_weights.safetensors").is_file()
    assert "| aspect-ratio buckets | --enable_bucket: sides 64-384 px" in (out / "README.md").read_text()


@pytest.mark.parametrize("flags,message", [
    (["--resolution", 288], r"^--resolution 288 is not a multiple of --bucket_reso_steps 64; try 256$"),
    (["--bucket_reso_steps", 32, "--min_bucket_reso", 64], r"^--bucket_reso_steps 32 is not a multiple of 64, "),
    (["--bucket_no_upscale"], r"^image .*small\.png is 50x300 px: with --bucket_no_upscale its bucket would be "
                              r"0x256, below --min_bucket_reso 64"),
])
def test_bad_bucket_input_stops_the_run_before_training(tiny, tmp_path, flags, message):
    """A bucket flag that cannot work, or an image --bucket_no_upscale cannot place: one line, nothing written."""
    import train_text_to_image_decoder

    data = write_photos(str(tmp_path / "photos"))
    Image.new("RGB", (50, 300)).save(os.path.join(data, "small.png"))
    with open(os.path.join(data, "metadata.jsonl"), "a") as f:
        f.write(json.dumps({"file_name": "small.png", "text": "a small picture"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=message):
        train_text_to_image_decoder.main(model_args(tiny, out, *BUCKETS, "--train_data_dir", data, *flags))
    assert not out.exists()
