"""The training dataset: loaded and checked before training (images open, captions are strings), its captions picked
and its images cropped, flipped and turned into the encoders' inputs. The batches: loader.py."""
import io
import json
import os

import numpy as np
from PIL import Image

from .loader import build_loader  # noqa: F401 (the scripts' data.build_loader)
from .params import UsageError

def load_train_dataset(args, seed, columns):
    """The training split as a `datasets.Dataset`, checked: it exists, is not empty, has `columns` (the image
    column first, then any caption column), and (after --max_train_samples) every image opens and every
    caption is a string or a list of strings."""
    import datasets

    datasets.disable_progress_bars()
    source = args.train_data_dir or args.dataset_name
    try:
        if args.train_data_dir is not None:
            ds = load_image_folder(args.train_data_dir, args.cache_dir)
        elif _is_saved_dataset(args.dataset_name):
            ds = datasets.load_from_disk(args.dataset_name)
        elif (folder := local_image_folder(args.dataset_name, args.dataset_config_name, args.cache_dir)) is not None:
            ds = read_image_folder(folder)  # what --train_data_dir accepts, --dataset_name accepts too
        else:
            ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    except UsageError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the first line of the reason
        if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ is not None:
            e = e.__cause__  # "An error occurred while generating the dataset" says nothing; its cause does
        raise UsageError(f"cannot load dataset {source!r}: {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UsageError(f"dataset {source!r} has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if len(ds) == 0:
        raise UsageError(f"dataset {source!r} is empty")
    for column in columns:
        if column not in ds.column_names:
            flag = "--image_column" if column == args.image_column else "--caption_column"
            raise UsageError(f"dataset {source!r} has no column {column!r} ({flag}); its columns are: "
                             f"{', '.join(ds.column_names)}")
    if args.max_train_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(args.max_train_samples, len(ds))))
    check_images(ds, args.image_column, source)
    for column in columns[1:]:
        check_captions(ds, column, source)
    return ds


def load_image_folder(folder, cache_dir):
    """`load_dataset("imagefolder", data_dir=folder)`, read by `read_image_folder`."""
    import datasets

    return read_image_folder(datasets.load_dataset_builder("imagefolder", data_dir=folder, cache_dir=cache_dir))


def local_image_folder(path, config_name, cache_dir):
    """The builder `load_dataset(path, config_name)` would use, if `path` is a local folder it reads as imagefolder
    (images, maybe with metadata files), else None."""
    import datasets

    if not os.path.isdir(path):
        return None
    builder = datasets.load_dataset_builder(path, config_name, cache_dir=cache_dir)
    return builder if builder.name == "imagefolder" else None


def read_image_folder(builder):
    """The dataset of an imagefolder `builder`, with its metadata files read by `read_metadata` and checked by
    `check_metadata_rows` (every time: a dataset already in the cache may have been built without the check). The
    builder is imagefolder's own, so its cache and fingerprints (which follow the files' modification times) are
    those of `load_dataset`."""
    tables = {}

    def read_once(path, metadata_ext=""):  # (imagefolder reads a metadata file again for every folder of images)
        if path not in tables:
            tables[path] = read_metadata(path, metadata_ext, builder._read_metadata)
        return tables[path][0]

    for path in sorted({f for files in builder.config.data_files.values() for f in files
                        if os.path.basename(f) in builder.METADATA_FILENAMES}):
        read_once(path, os.path.splitext(path)[1])
        check_metadata_rows(path, *tables[path], builder.EXTENSIONS)
    builder._read_metadata = read_once
    builder.download_and_prepare()
    return builder.as_dataset()


def read_metadata(path, metadata_ext, read):
    """An imagefolder metadata file as (pyarrow table, where each row is in the file, for messages). A
    metadata.jsonl is parsed here, not by pyarrow's reader, which refuses a column holding both strings and lists:
    in such a column a string becomes a list of one. Other files are left to imagefolder's `read`."""
    import pyarrow.json

    if metadata_ext != ".jsonl":
        try:
            table = read(path, metadata_ext=metadata_ext)
        except Exception as e:  # (pandas' or pyarrow's reader: many types)
            raise UsageError(f"cannot read {path}: {_first_line(e)}") from None
        return table, [f"row {i + 1}" for i in range(len(table))]
    lines, rows = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path}, line {n} is not JSON: {e}") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}, line {n} is not a JSON object (one {{\"file_name\": ..., ...}} per line)")
            lines.append(n)
            rows.append(row)
    if not rows:
        raise UsageError(f"{path} is empty: it needs a line {{\"file_name\": ..., ...}} for each image")
    listed = {key for row in rows for key, value in row.items() if isinstance(value, list)}
    rows = [{k: [v] if k in listed and isinstance(v, str) else v for k, v in row.items()} for row in rows]
    table = pyarrow.json.read_json(io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode()))
    return table, [f"line {n}" for n in lines]


def check_metadata_rows(path, table, places, extensions):
    """Every row of a metadata file names an image file that exists, and no other row names it: imagefolder would drop
    such a row without a word (a second row of an image replaces the first)."""
    names = table.column("file_name").to_pylist() if "file_name" in table.column_names else [None] * len(table)
    folder, seen = os.path.dirname(path), {}
    if not names:
        raise UsageError(f"{path} has no rows: it needs one for each image")
    for place, name in zip(places, names):
        if not isinstance(name, str):
            raise UsageError(f"{path}, {place}: no \"file_name\" (the image file the row describes)")
        if seen.setdefault(os.path.normpath(name), place) != place:
            raise UsageError(f"{path}, {place}: {name} has a row already ({seen[os.path.normpath(name)]}); "
                             "give each image one row (a list of captions for several)")
        if not os.path.isfile(os.path.join(folder, name)):
            raise UsageError(f"{path}, {place}: image file {name} does not exist in {folder}; add it or remove the row")
        if os.path.splitext(name)[1].lower() not in extensions:
            raise UsageError(f"{path}, {place}: {name} is not an image file (not a file type imagefolder reads)")


def check_captions(ds, column, source):
    rng = np.random.default_rng(0)
    for row, caption in enumerate(ds[column]):
        try:
            pick_caption(caption, rng, row)
        except ValueError as e:
            raise UsageError(f"column {column!r} of dataset {source!r}, {e}") from None


def _is_saved_dataset(path):
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def check_images(ds, column, source):
    """Open every image once (headers and integrity, not a full decode), so a broken file fails now
    with its name, not hours into training."""
    import datasets

    feature = ds.features[column]
    if not isinstance(feature, datasets.Image):
        raise UsageError(f"column {column!r} of dataset {source!r} holds {feature}, not images (--image_column)")
    for row, item in enumerate(_undecoded(ds, column)):
        name = item.get("path") or f"row {row}"
        try:
            with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as im:
                im.verify()
        except Exception as e:
            raise UsageError(f"unreadable image {name} (row {row} of {source!r}): {_first_line(e)}") from None


def captions_of(caption, row):
    """A caption cell as (list of captions, whether the cell was a list): a string, or a non-empty list of strings."""
    if isinstance(caption, str):
        return [caption], False
    if isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
        return list(caption), True
    raise ValueError(f"row {row}: a caption must be a string or a non-empty list of strings, got {caption!r}")


def caption_index(count, is_list, rng):
    """Which caption of a cell a step uses: a list's is drawn at random (one draw, even for a list of one)."""
    return int(rng.integers(count)) if is_list else 0


def _undecoded(ds, column, batch_size=256):
    """The column's images as {"bytes", "path"} items, a batch at a time (never the whole dataset in memory)."""
    import datasets

    raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    for batch in raw.iter(batch_size=batch_size):
        yield from batch[column]


def pick_caption(caption, rng, row):
    captions, is_list = captions_of(caption, row)
    return captions[caption_index(len(captions), is_list, rng)]


def image_sizes(ds, column):
    """Every image's (width, height), read from the file headers."""
    found = []
    for item in _undecoded(ds, column):
        with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as im:
            found.append(im.size)
    return found


def image_name(ds, column, row):
    """An image's file name for a message (its path, or "row <n>" where it has none)."""
    import datasets

    item = ds.select([row]).cast_column(column, datasets.Image(decode=False))[0][column]
    return item.get("path") or f"row {row}"


def crop_size(size, shape=None):
    """(width, height) of the largest region of an image of `size` (w, h) with the aspect ratio of `shape` (a bucket's
    (w, h)), or the largest square without one: the part of the image that is resized to the training size."""
    w, h = size
    if shape is None:
        return min(w, h), min(w, h)
    sw, sh = shape
    if w * sh >= h * sw:  # wider than the bucket: the full height
        return min(w, max(1, round(h * sw / sh))), h
    return w, min(h, max(1, round(w * sh / sw)))


def draw_view(rng, size, center, flip, shape=None):
    """The random part of the decoder's augmentation: (left, top, width, height, flipped) of the region taken from an
    image of `size` (w, h), a square or of the bucket `shape`'s aspect ratio. Drawn in a fixed order, so a cached
    sample draws the same numbers as a live one."""
    w, h = size
    crop_w, crop_h = crop_size(size, shape)
    if center:
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
    else:
        left, top = int(rng.integers(w - crop_w + 1)), int(rng.integers(h - crop_h + 1))
    flipped = bool(flip and rng.random() < 0.5)
    return left, top, crop_w, crop_h, flipped


def crop_view(image, view):
    """The region of `view`, maybe flipped, at the image's own resolution: PIL in (any mode), RGB PIL out. It is what
    the CLIP image processor gets (as in the references, which give it the image itself, not the resized one)."""
    left, top, width, height, flipped = view
    image = image.convert("RGB").crop((left, top, left + width, top + height))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flipped else image


def resize(image, shape):
    """A crop resized to `shape` (width, height), or to a square of side `shape`: what MoVQ gets."""
    shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
    return image.resize(shape, resample=Image.BICUBIC, reducing_gap=1)


def apply_view(image, view, shape):
    """The region of `view`, maybe flipped, resized to `shape` (see resize): PIL in (any mode), RGB PIL out."""
    return resize(crop_view(image, view), shape)


def view_inputs(image_processor, image, view, shape):
    """The two encoders' inputs for one view of `image`: (MoVQ's, from the resized crop; CLIP's, from the crop)."""
    crop = crop_view(image, view)
    return to_movq_input(resize(crop, shape)), clip_input(image_processor, crop)


def to_movq_input(image):
    """PIL RGB -> float32 CHW array in [-1, 1], what the MoVQ encoder expects."""
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def clip_input(image_processor, image):
    """PIL RGB -> the CLIP image encoder's float32 CHW input. The processor gets the pixels channels first, which tells
    it the layout: it guesses the channel axis from the shape (paddlenlp 2.8's has no input_data_format), and reads an
    image 1 or 3 pixels high as channels first, which fails (1 px: "mean must have 1 elements") or mixes rows and
    colours (3 px). A first axis of 3 it always reads as the channels; other images give the numbers they gave as
    PIL images."""
    pixels = np.asarray(image).transpose(2, 0, 1)
    return image_processor(pixels, return_tensors="np").pixel_values[0].astype(np.float32)
