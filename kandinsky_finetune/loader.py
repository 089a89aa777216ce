"""This rank's batches: the samples of each epoch shuffled and shared out by the resumable, sharded batch sampler,
built (in worker processes or not), stacked and handed to the loop as tensors.

Every random choice a sample needs (which caption of a list, crop position, flip, the diffusion noise
and timestep) is drawn from a generator seeded by (seed, epoch, sample index). So a sample's draws do not
depend on the batch size, the accumulation, the number of cards, data-loader workers or where a run was
resumed: a batch of 4 equals 4 accumulated batches of 1, and a resumed run sees exactly what an
uninterrupted one would have.
"""
import functools
import itertools
import os

import numpy as np
import paddle

from .faults import RunError, detach_worker, first_line

def sample_rng(seed, epoch, index):
    return np.random.default_rng([seed, epoch, index])


class TrainSet(paddle.io.Dataset):
    """Indexed by (epoch, row) keys from `ShardedBatchSampler`; `make_sample(example, rng, row)` builds the
    arrays of one sample with the generator for that key."""

    def __init__(self, hf_dataset, make_sample, seed):
        self.ds, self.make_sample, self.seed = hf_dataset, make_sample, seed
        self.row = numeric_rows(hf_dataset) or hf_dataset.__getitem__

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        epoch, row = key
        try:
            return self.make_sample(self.row(row), sample_rng(self.seed, epoch, row), row)
        except Exception as e:  # e.g. an image whose header was fine but whose data is not
            return {"sample_error": f"cannot prepare row {row} of the dataset: {first_line(e)}"}


def numeric_rows(ds):
    """For a dataset of numbers in numpy format (the encoder caches), row(i) -> what ds[i] gives, read from its Arrow
    table directly (column_reader), not through `datasets`' row formatting, which is a few % of a cached prior step on
    small models. None for any other dataset (images, text, an index mapping)."""
    import datasets

    numeric = all(isinstance(f, datasets.Value) and f.dtype != "string" or isinstance(f, datasets.Sequence)
                  and isinstance(f.feature, datasets.Value) and f.feature.dtype != "string" for f in ds.features.values())
    if not numeric or ds.format["type"] != "numpy" or ds._indices is not None:
        return None
    columns = {name: column_reader(ds.data.column(name)) for name in ds.column_names}
    return lambda i: {name: read(i) for name, read in columns.items()}


def column_reader(column):
    """row(i) -> the value at row i of a numeric Arrow column as datasets' numpy formatter gives it (integers as int64,
    a single value as a 0-d array of the Python value's type), read as numpy slices of the table's own buffers: Arrow
    scalars cost ~20 us each, a few % of a cached prior step on small models."""
    import bisect

    import pyarrow

    chunks = [chunk for chunk in column.chunks if len(chunk)]
    starts = list(itertools.accumulate([0] + [len(chunk) for chunk in chunks[:-1]]))
    if pyarrow.types.is_list(column.type) or pyarrow.types.is_large_list(column.type):
        lists = [(chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=False)) for chunk in chunks]

        def row(i):
            k = bisect.bisect_right(starts, i) - 1
            (offsets, values), j = lists[k], i - starts[k]
            array = values[offsets[j]:offsets[j + 1]]
            return array.astype(np.int64) if array.dtype.kind in "iu" else array
    else:
        scalars = [chunk.to_numpy(zero_copy_only=False) for chunk in chunks]

        def row(i):
            k = bisect.bisect_right(starts, i) - 1
            return np.asarray(scalars[k][i - starts[k]].item())
    return row


class ShardedBatchSampler:
    """Shuffles every epoch with (seed, epoch), gives each rank its own share, and can start an epoch
    part-way (resume). Every rank gets the same number of batches: the permutation is padded by wrapping."""

    def __init__(self, num_samples, batch_size, rank, world_size, seed):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = num_samples, batch_size, rank, world_size, seed
        self.epoch, self.skip = 0, 0
        self.per_rank = -(-num_samples // world_size)
        self.batches_per_epoch = -(-self.per_rank // batch_size)

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self):
        return self.batches_per_epoch - self.skip

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        order = np.resize(order, self.per_rank * self.world_size)  # wraps around to pad
        mine = order[self.rank::self.world_size]
        for b in range(self.skip, self.batches_per_epoch):
            yield [(self.epoch, int(i)) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]


class SampleError(RunError):
    """A sample that cannot be built during training (exit 1): one clear line, not a hang or a worker traceback."""


def collate(samples):
    """Samples stacked into numpy batch arrays; if one of them failed, the batch is that failure's message."""
    for sample in samples:
        if "sample_error" in sample:
            return {"sample_error": np.frombuffer(sample["sample_error"].encode(), dtype=np.uint8)}
    return {name: np.stack([sample[name] for sample in samples]) for name in samples[0]}


class Loader:
    """This rank's batches as tensors, built in this process (--dataloader_num_workers 0) or in Paddle's worker
    processes, and then `prepare`d (the frozen encoders' outputs added), with `read_ahead` one batch ahead in a
    second thread (prefetch.py). An error while building a sample travels as data and is raised here: raised inside
    Paddle 3.3's DataLoader it leaves the training loop waiting forever."""

    def __init__(self, dataset, sampler, num_workers, prepare=None, read_ahead=False):
        self.dataset, self.sampler, self.prepare = dataset, sampler, prepare or (lambda batch: batch)
        self.read_ahead = read_ahead
        # workers survive a stop signal sent to the process group, and die with this process (faults.detach_worker)
        self.workers = paddle.io.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, use_shared_memory=False,
            worker_init_fn=functools.partial(detach_worker, parent=os.getpid())) if num_workers else None

    def epochs(self, first_epoch, skip_batches, end_epoch):
        """One stream of prepared batches over epochs first_epoch..end_epoch-1 (the first without its first
        `skip_batches`, when resuming mid-epoch). Read ahead, the next epoch's first batch is encoded while this
        epoch's last one trains. Close it when done."""
        from .prefetch import ahead

        def batches():
            for epoch in range(first_epoch, end_epoch):
                self.sampler.set_epoch(epoch, skip_batches=skip_batches if epoch == first_epoch else 0)
                yield from self._batches()

        # With worker processes Paddle's DataLoader reads ahead itself; its iterator, driven from a second thread,
        # can hang the process at exit (its clean-up starts a thread then), so the encoders run in this thread.
        if self.read_ahead and not self.workers:
            return ahead(batches(), self.prepare)
        return (self.prepare(batch) for batch in batches())

    def _batches(self):
        batches = self.workers if self.workers else (collate([self.dataset[key] for key in keys]) for keys in self.sampler)
        for batch in batches:
            if "sample_error" in batch:
                error = batch["sample_error"]
                raise SampleError(bytes(error.numpy() if isinstance(error, paddle.Tensor) else error).decode())
            yield {name: value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
                   for name, value in batch.items()}


def build_loader(hf_dataset, make_sample, args, ctx, seed, prepare=None, read_ahead=False, buckets=None):
    """This rank's (sampler, loader) over the dataset; `prepare(batch)` runs on each batch before its step, with
    `read_ahead` in a second thread while the step before runs. With `buckets` (each row's bucket, buckets.py)
    every batch comes from one bucket."""
    from .buckets import BucketBatchSampler

    sampler = (BucketBatchSampler(buckets, args.train_batch_size, ctx.rank, ctx.world_size, seed) if buckets else
               ShardedBatchSampler(len(hf_dataset), args.train_batch_size, ctx.rank, ctx.world_size, seed))
    return sampler, Loader(TrainSet(hf_dataset, make_sample, seed), sampler, args.dataloader_num_workers, prepare,
                           read_ahead)


def as_tensor(x):
    """A loader's tensor as it is, a numpy array (the cache's encoding batches) as a tensor."""
    return x if isinstance(x, paddle.Tensor) else paddle.to_tensor(x)
