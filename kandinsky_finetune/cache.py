"""--cache_encoder_outputs: the frozen encoders' outputs, computed once and kept on disk by `datasets`.

The cache is `datasets`' own `map` cache (Arrow files beside the dataset's cache, memory-mapped when read,
so a dataset larger than RAM works). Its fingerprint covers everything the outputs depend on: the dataset
(files, revision, selection), the encoders' weights and configs, the preprocessing (image processor,
tokenizer, resolution, crop and flip), the dtype and the device type. Change any of them and the cache
is rebuilt; nothing stale is reused. On several cards each rank encodes its own contiguous shard, then every
rank reads all shards, so the work is split and everybody trains from the same cache.
"""
import hashlib
import json
import os

# Bump when what a script stores in the cache changes, so old caches are not read with the new meaning.
CACHE_VERSION = "3"  # 2: the decoder's CLIP input is the crop before resizing; 3: images 1 or 3 px high read right


def fingerprint(*parts):
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def model_fingerprint(model):
    """The model's config plus, per tensor, its shape and a few statistics of its values: another checkpoint
    of the same architecture changes them. Computed where the weights live, without copying them out."""
    import paddle

    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    stats = []
    with paddle.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().flatten().cast("float64")
            stats.append([name, list(tensor.shape), float(flat.sum()), float((flat * flat).sum()),
                          float(flat[0]), float(flat[-1])])
    return fingerprint(type(model).__name__, config, stats)


def encode_dataset(ds, encode_batch, features, key, batch_size, ctx, log, clock):
    """`ds` mapped through `encode_batch` (a datasets batched-map function returning the `features` columns,
    which replace all of ds's columns), cached under a fingerprint made of ds's and `key`.
    Returns the encoded dataset in numpy format, rows in ds's order."""
    import datasets

    from . import distributed

    encoded_here = []

    def counted(batch):
        out = encode_batch(batch)
        encoded_here.append(len(next(iter(out.values()))))
        return out

    def shard(rank):
        part = ds.shard(num_shards=ctx.world_size, index=rank, contiguous=True)
        new_fingerprint = fingerprint(CACHE_VERSION, part._fingerprint, key)
        kwargs = {}
        if not part.cache_files:  # an in-memory dataset: give its cache a place on disk
            folder = os.path.join(datasets.config.HF_DATASETS_CACHE, "kandinsky_finetune")
            os.makedirs(folder, exist_ok=True)
            kwargs["cache_file_name"] = os.path.join(folder, f"encoded-{new_fingerprint}.arrow")
        return part.map(counted, batched=True, batch_size=batch_size, remove_columns=part.column_names,
                        features=features, new_fingerprint=new_fingerprint, writer_batch_size=64,
                        desc="encoding (kept for later runs)", **kwargs)

    with clock.phase("encoding"):
        if ctx.is_main:
            datasets.enable_progress_bars()
        try:
            mine = shard(ctx.rank)
        finally:
            datasets.disable_progress_bars()
        # every shard is on disk before anyone reads the others'; ranks may finish minutes apart
        distributed.wait_for_everyone("encoding their shards", ctx)
        parts = [mine if rank == ctx.rank else shard(rank) for rank in range(ctx.world_size)]
    encoded = datasets.concatenate_datasets(parts) if len(parts) > 1 else mine
    files = sorted({f["filename"] for f in encoded.cache_files})
    size = sum(os.path.getsize(f) for f in files) / 2 ** 20
    done = sum(encoded_here)
    log(f"encoder-output cache: {'encoded ' + str(done) + ' samples here, ' if done else 'reused, '}"
        f"{len(encoded)} samples, {size:.1f} MB in {os.path.dirname(files[0]) if files else '?'}")
    return encoded.with_format("numpy")

