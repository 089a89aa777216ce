"""Aspect-ratio buckets for the decoder (--enable_bucket): the bucket sizes, each image's bucket, and the resumable,
sharded batch sampler whose every batch comes from one bucket.

A bucket is a width x height on the --bucket_reso_steps grid; without --bucket_no_upscale they are, for each width
from --min_bucket_reso to --max_bucket_reso, the tallest height on the grid (within the same limits) whose area is at
most --resolution squared, and the same pairs turned on their side. An image goes to the bucket nearest its aspect
ratio (on a log scale, so 2:1 and 1:2 are as far from 1:1), the larger bucket on a tie. With --bucket_no_upscale an
image gets its own size instead, shrunk to that area and to --max_bucket_reso when larger, rounded down to the grid.
"""
import collections
import math

import numpy as np

from .params import UsageError


def check_args(args, grid=None):
    """The bucket flags make sense together, and with the models once their `grid` is known (the pixels bucket sides
    must be multiples of, grid_of)."""
    step, low, high = args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso
    if step < 1:
        raise UsageError(f"--bucket_reso_steps must be at least 1 (got {step})")
    if grid and step % grid:
        raise UsageError(f"--bucket_reso_steps {step} is not a multiple of {grid}, the size grid the decoder generates "
                         f"on (MoVQ's factor squared) and its UNet's stride; try {max(grid, step // grid * grid)}")
    for flag, value in (("--min_bucket_reso", low), ("--max_bucket_reso", high), ("--resolution", args.resolution)):
        if value < step or value % step:
            raise UsageError(f"{flag} {value} is not a multiple of --bucket_reso_steps {step}; try "
                             f"{max(step, value // step * step)}")
    if low > high:
        raise UsageError(f"--min_bucket_reso {low} is larger than --max_bucket_reso {high}")
    if not sizes(args):
        raise UsageError(f"no bucket between --min_bucket_reso {low} and --max_bucket_reso {high} has an area of at "
                         f"most --resolution {args.resolution} squared; lower --min_bucket_reso")


def grid_of(movq_factor, unet_levels):
    """The pixels every bucket side is a multiple of: the pipeline generates at multiples of MoVQ's factor squared
    (64 px for Kandinsky 2.2: it rounds other sizes up), and the UNet halves its latents unet_levels - 1 times."""
    return math.lcm(movq_factor ** 2, movq_factor * 2 ** (unet_levels - 1))


def sizes(args):
    """The buckets as sorted (width, height) pairs (without --bucket_no_upscale, the only ones used)."""
    step, low, high, area = args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso, args.resolution ** 2
    found = set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            found |= {(width, height), (height, width)}
    return sorted(found)


def largest(args):
    """The bucket of the largest area (the one the memory plan counts): with --bucket_no_upscale no image's own
    bucket is larger than this either, both being at most --resolution squared and on the grid."""
    return max(sizes(args), key=lambda s: (s[0] * s[1], -abs(s[0] - s[1])))


def bucket_of(size, args, candidates=None):
    """The bucket (width, height) of an image of `size` (w, h)."""
    w, h = size
    if args.bucket_no_upscale:
        return own_bucket(size, args)
    aspect = math.log(w / h)
    return min(candidates or sizes(args), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1], s))


def own_bucket(size, args):
    """--bucket_no_upscale: the image's own size, never enlarged: scaled down to --resolution squared and to
    --max_bucket_reso where larger, rounded down to the grid."""
    w, h = size
    step = args.bucket_reso_steps
    scale = min(1.0, args.resolution / math.sqrt(w * h), args.max_bucket_reso / max(w, h))
    return int(w * scale) // step * step, int(h * scale) // step * step


def assign(image_sizes, args, names):
    """Each image's bucket, in the dataset's order; with --bucket_no_upscale an image whose bucket would be smaller
    than --min_bucket_reso is one line naming it (`names(row)`)."""
    candidates = sizes(args)
    buckets = [bucket_of(size, args, candidates) for size in image_sizes]
    for row, (size, bucket) in enumerate(zip(image_sizes, buckets)):
        if min(bucket) < args.min_bucket_reso:
            raise UsageError(f"image {names(row)} is {size[0]}x{size[1]} px: with --bucket_no_upscale its bucket "
                             f"would be {bucket[0]}x{bucket[1]}, below --min_bucket_reso {args.min_bucket_reso}; drop "
                             "the image, lower --min_bucket_reso, or train without --bucket_no_upscale")
    return buckets


def table(buckets):
    """The bucket table the run logs: one line per bucket in use, largest count first."""
    counts = collections.Counter(buckets)
    lines = [f"{len(counts)} aspect-ratio bucket{'s' if len(counts) != 1 else ''} (width x height: images):"]
    lines += [f"  {w:>5} x {h:<5} {w / h:5.2f}:1  {n} image{'s' if n != 1 else ''}"
              for (w, h), n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return "\n".join(lines)


def most_common(buckets):
    """The size most images train at (validation generates at it too); the larger bucket on a tie."""
    counts = collections.Counter(buckets)
    return max(counts, key=lambda s: (counts[s], s[0] * s[1], s))


class BucketBatchSampler:
    """ShardedBatchSampler's contract (loader.py) for bucketed images: every epoch, with (seed, epoch), each bucket's
    images are shuffled and cut into global batches of batch_size x world_size (the last one filled up with that
    bucket's images taken again), the global batches are shuffled, and rank r takes its slice of each. So every rank
    gets whole batches of one bucket, all ranks the same number, and one process with the same global batch sees
    the same images at every step. An epoch can start part-way (resume)."""

    def __init__(self, buckets, batch_size, rank, world_size, seed):
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.rows = collections.defaultdict(list)
        for row, bucket in enumerate(buckets):
            self.rows[bucket].append(row)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = sum(-(-len(rows) // self.global_batch) for rows in self.rows.values())
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self):
        return self.batches_per_epoch - self.skip

    def global_batches(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in sorted(self.rows):
            rows = rng.permutation(self.rows[bucket])
            rows = np.resize(rows, -(-len(rows) // self.global_batch) * self.global_batch)  # wraps around to fill
            batches += [rows[i:i + self.global_batch] for i in range(0, len(rows), self.global_batch)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for batch in self.global_batches(self.epoch)[self.skip:]:
            yield [(self.epoch, int(i)) for i in batch[mine]]
