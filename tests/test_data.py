"""The sampler shards and reshuffles per epoch, resumes mid-epoch, and a sample's random draws depend only
on (seed, epoch, row), never on batching. Images in any mode (grey, with alpha, palette, CMYK JPEG) become RGB
for the MoVQ and CLIP encoders, and a dataset of such images trains. A caption column may mix strings and lists."""
import io
import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, logged, model_args, run, state_dict_of
from kandinsky_finetune import decoder, prior
from kandinsky_finetune.data import apply_view, clip_input, draw_view, load_train_dataset, pick_caption, to_movq_input
from kandinsky_finetune.loader import ShardedBatchSampler, sample_rng


def epoch_rows(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return [row for batch in sampler for (_, row) in batch]


def test_ranks_get_disjoint_shards_covering_the_data():
    ranks = [ShardedBatchSampler(10, 2, rank, 2, seed=3) for rank in range(2)]
    rows = [epoch_rows(s, 0) for s in ranks]
    assert len(rows[0]) == len(rows[1]) == 5 and set(rows[0]).isdisjoint(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(10))


def test_uneven_data_gives_every_rank_the_same_number_of_batches():
    ranks = [ShardedBatchSampler(7, 2, rank, 2, seed=0) for rank in range(2)]
    assert [len(list(s)) for s in ranks] == [2, 2]


def test_each_epoch_is_shuffled_differently_and_resume_skips_done_batches():
    s = ShardedBatchSampler(20, 4, 0, 1, seed=0)
    e0, e1 = epoch_rows(s, 0), epoch_rows(s, 1)
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1
    assert epoch_rows(s, 1, skip=2) == e1[8:]
    assert len(s) == 3


def test_sample_draws_depend_only_on_seed_epoch_row():
    a, b = sample_rng(0, 1, 5).standard_normal(4), sample_rng(0, 1, 5).standard_normal(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_rng(0, 2, 5).standard_normal(4))


def test_captions_string_or_list_picked_at_random():
    assert pick_caption("a cat", np.random.default_rng(0), 0) == "a cat"
    picks = {pick_caption(["a", "b", "c"], np.random.default_rng(i), 0) for i in range(30)}
    assert picks == {"a", "b", "c"}
    with pytest.raises(ValueError, match="row 7"):
        pick_caption(None, np.random.default_rng(0), 7)


# ---------------------------------------------------------------- image modes
MODES = {"L": "PNG", "RGBA": "PNG", "P": "PNG", "CMYK": "JPEG"}


def picture(size=(64, 48)):
    """An RGB picture with three colours, so a wrong channel order or a dropped channel shows."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[..., 0] = 200
    array[10:, :20] = 255
    array[:5, 30:] = [10, 90, 160]
    return Image.fromarray(array)


def encoded(image, mode):
    """The file of `image` converted to `mode`: PNG, or JPEG for CMYK."""
    converted = image.convert(mode)
    if mode == "RGBA":
        converted.putalpha(Image.linear_gradient("L").resize(image.size))  # not all opaque
    buffer = io.BytesIO()
    converted.save(buffer, format=MODES[mode])
    return buffer.getvalue()


def in_mode(image, mode):
    """`image` converted to `mode` and read back from its file, as a dataset would."""
    reopened = Image.open(io.BytesIO(encoded(image, mode)))
    assert reopened.mode == mode
    return reopened


@pytest.mark.parametrize("mode", list(MODES))
def test_apply_view_makes_rgb_from_any_mode(mode):
    image = in_mode(picture(), mode)
    view = (8, 0, 48, 48, True)
    out = apply_view(image, view, 32)
    assert out.mode == "RGB" and out.size == (32, 32)
    # the same pixels as converting to RGB first (alpha dropped, palette and CMYK mapped to RGB)
    assert np.array_equal(np.asarray(out), np.asarray(apply_view(image.convert("RGB"), view, 32)))
    movq_input = to_movq_input(out)
    assert movq_input.shape == (3, 32, 32) and movq_input.dtype == np.float32
    if mode == "L":  # grey: the three channels are equal
        assert np.array_equal(movq_input[0], movq_input[1]) and np.array_equal(movq_input[1], movq_input[2])


def fake_components(tiny):
    """What prior/decoder.sample_maker read from the loaded components: the real image processor and tokenizer."""
    from ppdiffusers.transformers import CLIPImageProcessor, CLIPTokenizer

    config = SimpleNamespace  # a model's or scheduler's .config
    return SimpleNamespace(
        image_processor=CLIPImageProcessor.from_pretrained(os.path.join(tiny.prior, "image_processor")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tiny.prior, "tokenizer")),
        noise_scheduler=SimpleNamespace(config=config(num_train_timesteps=1000)),
        prior=SimpleNamespace(config=config(embedding_dim=32)), unet=SimpleNamespace(config=config(in_channels=4)),
        factor=8)


def test_training_samples_are_rgb_for_any_mode(tiny):
    c = fake_components(tiny)
    args = SimpleNamespace(image_column="image", caption_column="text", resolution=64, random_crop=False,
                           random_flip=False, noise_offset=0.0)
    make_prior, make_decoder = prior.sample_maker(args, c), decoder.sample_maker(args, c)
    rgb = picture()
    for mode in MODES:
        image = in_mode(rgb, mode)
        example = {"image": image, "text": "a red picture"}
        clip = make_prior(example, sample_rng(0, 0, 0), 0)["clip_pixel_values"]
        assert clip.shape == (3, 32, 32), mode  # the prior's CLIP image encoder input
        np.testing.assert_array_equal(clip, clip_input(c.image_processor, image.convert("RGB")), err_msg=mode)
        sample = make_decoder(example, sample_rng(0, 0, 0), 0)
        assert sample["pixel_values"].shape == (3, 64, 64), mode  # MoVQ input
        assert sample["clip_pixel_values"].shape == (3, 32, 32), mode


def test_decoder_crops_the_centre_unless_random_crop(tiny, tmp_path):
    """The references' centre crop is the default; --random_crop draws the square's place; not both."""
    import train_text_to_image_decoder

    c = fake_components(tiny)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 160, 3), dtype=np.uint8))  # 129 squares
    centre = to_movq_input(apply_view(image, (64, 0, 32, 32, False), 32))

    def movq_inputs(*flags):
        make = decoder.sample_maker(train_text_to_image_decoder.parse_args(
            ["--train_data_dir", str(tmp_path), "--resolution", "32", *flags]), c)
        return [make({"image": image}, sample_rng(0, 0, row), row)["pixel_values"] for row in range(4)]

    for flags in [], ["--center_crop"]:
        assert all(np.array_equal(x, centre) for x in movq_inputs(*flags)), flags
    assert not any(np.array_equal(x, centre) for x in movq_inputs("--random_crop"))
    with pytest.raises(SystemExit) as e:
        train_text_to_image_decoder.parse_args(["--train_data_dir", str(tmp_path), "--random_crop", "--center_crop"])
    assert e.value.code == 2


def test_decoder_clip_input_is_the_crop_before_resizing(tiny):
    """MoVQ gets the crop resized to --resolution, the CLIP image processor the (flipped) crop at full quality."""
    c = fake_components(tiny)
    args = SimpleNamespace(image_column="image", resolution=8, random_crop=True, random_flip=True, noise_offset=0.0)
    make = decoder.sample_maker(args, c)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    flips = set()
    for row in range(8):
        view = draw_view(sample_rng(0, 0, row), image.size, center=False, flip=True)  # the view make() draws
        flips.add(view[4])
        sample = make({"image": image}, sample_rng(0, 0, row), row)
        left, top, width, height, flipped = view
        crop = image.crop((left, top, left + width, top + height))
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flipped else crop
        np.testing.assert_array_equal(sample["pixel_values"], to_movq_input(apply_view(image, view, 8)))
        np.testing.assert_array_equal(sample["clip_pixel_values"], clip_input(c.image_processor, crop))
        resized = clip_input(c.image_processor, apply_view(image, view, 8))
        assert np.abs(sample["clip_pixel_values"] - resized).max() > 0.1  # not the 8-pixel image, upscaled
    assert flips == {False, True}


def dataset_in_modes(tiny, folder):
    """The first 4 tiny images, one per mode of MODES (the CMYK one a JPEG), with their captions."""
    folder.mkdir()
    rows = [json.loads(line) for line in open(os.path.join(tiny.data, "metadata.jsonl"))][:len(MODES)]
    with open(folder / "metadata.jsonl", "w") as f:
        for row, (mode, fmt) in zip(rows, MODES.items()):
            name = os.path.splitext(row["file_name"])[0] + (".jpg" if fmt == "JPEG" else ".png")
            (folder / name).write_bytes(encoded(Image.open(os.path.join(tiny.data, row["file_name"])), mode))
            assert Image.open(folder / name).mode == mode
            f.write(json.dumps({**row, "file_name": name}) + "\n")
    return folder


@pytest.mark.parametrize("script,model,extra", [
    ("train_text_to_image_decoder.py", "unet", []),  # MoVQ and CLIP inputs made per step
    ("train_text_to_image_prior.py", "prior", ["--cache_encoder_outputs"]),  # CLIP inputs made once, for the cache
], ids=["decoder", "prior-cached"])
def test_a_dataset_of_grey_alpha_palette_and_cmyk_images_trains(tiny, tmp_path, script, model, extra):
    data = dataset_in_modes(tiny, tmp_path / "data")
    out = tmp_path / "out"
    # A subprocess with a time limit: a sample that fails to build hangs Paddle's single-process DataLoader
    # (the exception kills its reader thread, the training loop waits forever) instead of failing.
    args = model_args(tiny, out, "--cache_dir", tmp_path / "hf", "--max_train_steps", 1,
                      "--train_batch_size", len(MODES), *extra)  # the one step sees all 4 images
    args[args.index("--train_data_dir") + 1] = str(data)
    proc = run([sys.executable, "-u", str(ROOT / script), *args], timeout=300)
    if extra:
        assert "encoder-output cache: encoded 4 samples here" in proc.stderr
    losses = logged(out)
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert all(np.isfinite(v).all() for v in state_dict_of(out / model).values())


# ---------------------------------------------------------------- captions: strings and lists in one column
def with_string_captions(tiny, folder):
    """The tiny dataset (a list of captions in every row) with its lists of one written as plain strings."""
    shutil.copytree(tiny.data, folder)
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    with open(folder / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "text": row["text"][0] if len(row["text"]) == 1 else row["text"]}) + "\n")
    assert {type(row["text"]) for row in map(json.loads, open(folder / "metadata.jsonl"))} == {str, list}
    return folder


def load_folder(folder, cache_dir):
    args = SimpleNamespace(train_data_dir=str(folder), dataset_name=None, dataset_config_name=None,
                           cache_dir=str(cache_dir), image_column="image", max_train_samples=None)
    return load_train_dataset(args, 0, ["image", "text"])


def test_a_string_caption_beside_lists_is_a_list_of_one(tiny, tmp_path):
    mixed = load_folder(with_string_captions(tiny, tmp_path / "mixed"), tmp_path / "hf")
    # the same cells as the all-lists original, so the same caption picks
    assert mixed["text"] == load_folder(tiny.data, tmp_path / "hf")["text"]
    # the fingerprint (the --cache_encoder_outputs key) is stable, and follows the metadata and the images
    fingerprint = mixed._fingerprint
    assert load_folder(tmp_path / "mixed", tmp_path / "hf")._fingerprint == fingerprint
    metadata = tmp_path / "mixed" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("a red picture", "a crimson picture"))
    recaptioned = load_folder(tmp_path / "mixed", tmp_path / "hf")
    assert recaptioned._fingerprint != fingerprint and ["a crimson picture"] in recaptioned["text"]
    image = tmp_path / "mixed" / "004.png"
    picture().save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))  # a coarse clock still moves
    assert load_folder(tmp_path / "mixed", tmp_path / "hf")._fingerprint not in (fingerprint, recaptioned._fingerprint)


def test_a_local_folder_given_as_dataset_name_is_read_as_train_data_dir_is(tiny, tmp_path):
    """`load_dataset` refused a caption column mixing strings and lists ("ArrowInvalid: ... changed from string to
    array"); --dataset_name naming a local image folder now goes through --train_data_dir's loader."""
    folder = with_string_captions(tiny, tmp_path / "mixed")
    args = SimpleNamespace(train_data_dir=None, dataset_name=str(folder), dataset_config_name=None,
                           cache_dir=str(tmp_path / "hf"), image_column="image", max_train_samples=None)
    assert load_train_dataset(args, 0, ["image", "text"])["text"] == load_folder(folder, tmp_path / "hf")["text"]


def test_a_dataset_mixing_string_and_list_captions_trains(tiny, tmp_path):
    data = with_string_captions(tiny, tmp_path / "data")
    out = tmp_path / "out"
    args = model_args(tiny, out, "--max_train_steps", 2, "--train_batch_size", 4, "--cache_dir", tmp_path / "hf")
    args[args.index("--train_data_dir") + 1] = str(data)
    run([sys.executable, "-u", str(ROOT / "train_text_to_image_prior.py"), *args], timeout=300)
    losses = logged(out)
    assert len(losses) == 2 and all(map(math.isfinite, losses))


# ---------------------------------------------------------------- images 1 or 3 pixels on a side
TINY_SIZES = [(1, 1), (1, 3), (3, 1), (3, 3), (5, 3)]  # (width, height)


def clip_by_hand(processor, image):
    """What CLIP's preprocessing means for an RGB image: shortest side resized to `size`, centre crop, scaled to
    [0, 1], normalized, channels first."""
    (w, h), side, crop = image.size, processor.size["shortest_edge"], processor.crop_size["height"]
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    pixels = np.asarray(image.resize(size, resample=processor.resample), dtype=np.float32) / 255
    top, left = (size[1] - crop) // 2, (size[0] - crop) // 2
    pixels = pixels[top:top + crop, left:left + crop]
    return ((pixels - np.array(processor.image_mean)) / np.array(processor.image_std)).transpose(2, 0, 1)


@pytest.mark.parametrize("size", TINY_SIZES + [(40, 56)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_clip_input_of_an_image_1_or_3_pixels_high(tiny, size):
    """The image processor guessed the channel axis from the array's shape: a 1-pixel-high image stopped training
    ("mean must have 1 elements"), a 3-pixel-high one had its rows taken for colours."""
    processor = fake_components(tiny).image_processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    np.testing.assert_allclose(clip_input(processor, image), clip_by_hand(processor, image), atol=1e-5)


@pytest.mark.parametrize("script,model", [("train_text_to_image_decoder.py", "unet"),
                                          ("train_text_to_image_prior.py", "prior")], ids=["decoder", "prior"])
def test_a_dataset_of_images_1_or_3_pixels_on_a_side_trains(tiny, tmp_path, script, model):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as f:
        for k, (w, h) in enumerate(TINY_SIZES):
            picture((w, h)).save(data / f"{w}x{h}.png")
            f.write(json.dumps({"file_name": f"{w}x{h}.png", "text": f"picture {k}"}) + "\n")
    out = tmp_path / "out"
    args = model_args(tiny, out, "--cache_dir", tmp_path / "hf", "--max_train_steps", 1,
                      "--train_batch_size", len(TINY_SIZES))  # the one step sees them all
    args[args.index("--train_data_dir") + 1] = str(data)
    run([sys.executable, "-u", str(ROOT / script), *args], timeout=300)
    losses = logged(out)
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert all(np.isfinite(v).all() for v in state_dict_of(out / model).values())


def test_cached_rows_read_from_arrow_are_what_datasets_gives():
    """TrainSet reads a cache's rows from its Arrow table (loader.numeric_rows): same values, dtypes and shapes as
    ds[i] in numpy format, through select/shuffle/shard; datasets with images or text keep datasets' reader."""
    import datasets

    from kandinsky_finetune.loader import numeric_rows

    features = datasets.Features({"latents": datasets.Sequence(datasets.Value("float32")),
                                  "size": datasets.Sequence(datasets.Value("int32")),
                                  "caption_is_list": datasets.Value("bool"), "timestep": datasets.Value("int64")})
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict({"latents": [rng.standard_normal(6, dtype=np.float32) for _ in range(8)],
                                     "size": [[i, 2 * i] for i in range(8)], "caption_is_list": [i % 2 == 0 for i in range(8)],
                                     "timestep": list(range(8))}, features=features).with_format("numpy")
    # (a dataset with an index mapping, as select/shuffle make, keeps datasets' reader: None)
    concatenated = datasets.concatenate_datasets([ds, ds.shard(2, 1, contiguous=True)]).with_format("numpy")
    assert len(concatenated.data.column("latents").chunks) == 2  # rows are looked up across chunks, sliced ones too
    for part in ds, ds.shard(2, 1, contiguous=True), ds.select([1, 2]), concatenated:
        row = numeric_rows(part)
        assert row is not None
        for i in range(len(part)):
            expected, got = part[i], row(i)
            assert expected.keys() == got.keys()
            for name in expected:
                assert (got[name].dtype, got[name].shape) == (expected[name].dtype, expected[name].shape), name
                np.testing.assert_array_equal(got[name], expected[name])
    assert numeric_rows(ds.with_format(None)) is None and numeric_rows(ds.shuffle(seed=0)) is None
    assert numeric_rows(datasets.Dataset.from_dict({"text": ["a"]}).with_format("numpy")) is None
