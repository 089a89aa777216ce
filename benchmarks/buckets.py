"""Aspect-ratio buckets against the square crop on a non-square data set, in one run: the decoder script's speed and
the share of each picture it never trains on.

    python benchmarks/buckets.py [--workdir DIR] [--steps 30] [--repeats 3]

On the benchmark's tiny "reference" models (benchmarks/run.py builds them, or reuses them in --workdir), 18 pictures,
a third each 16:9 (192x108), 1:1 (120x120) and 2:3 (120x180); train_text_to_image_decoder.py at --resolution 64,
batch 2, with the default centre square and with --enable_bucket on a 16 px grid (the reference UNet's stride is 4 px;
buckets 80x48, 64x64 and 48x80), runs of the two alternating. Prints the median steps/s and samples/s of each, and
the pixels of the pictures that the crop leaves out (neither pads: a bucket's crop is resized, never padded).
"""
import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import run as bench  # (benchmarks/run.py: keeps the environment as given, before paddle sets OMP_NUM_THREADS)

PICTURES = [((192, 108), 6), ((120, 120), 6), ((120, 180), 6)]
BUCKET_FLAGS = ["--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]


def write_pictures(folder):
    import numpy as np
    from PIL import Image

    if os.path.isdir(folder):
        return folder
    os.makedirs(folder + ".partial", exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder + ".partial", "metadata.jsonl"), "w") as f:
        for k, ((w, h), count) in enumerate(PICTURES):
            for i in range(count):
                name = f"{w}x{h}-{i}.png"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    os.path.join(folder + ".partial", name))
                f.write(json.dumps({"file_name": name, "text": f"picture {k} {i}"}) + "\n")
    os.rename(folder + ".partial", folder)
    return folder


def cropped_away(bucketed):
    """The share of the pictures' pixels outside the crop, over the data set."""
    from kandinsky_finetune import buckets, data

    args = SimpleNamespace(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                           bucket_no_upscale=False)
    total = kept = 0
    for size, count in PICTURES:
        crop_w, crop_h = data.crop_size(size, buckets.bucket_of(size, args) if bucketed else None)
        total, kept = total + count * size[0] * size[1], kept + count * crop_w * crop_h
    return 1 - kept / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(bench.ROOT, "benchmark_output"))
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each; the medians are printed.")
    args = parser.parse_args()
    import paddle

    started = time.time()
    prior_repo, decoder_repo, _ = bench.build(args.workdir, "reference")
    pictures = write_pictures(os.path.join(args.workdir, "pictures-16x9-1x1-2x3"))
    hf_cache = os.path.join(args.workdir, "reference", "hf-datasets-cache")
    out = os.path.join(args.workdir, "reference", "decoder-buckets")
    results = {"square crop": [], "buckets": []}
    for r in range(args.repeats):
        for kind in (list(results) if r % 2 == 0 else list(results)[::-1]):
            result = bench.run("decoder", prior_repo, decoder_repo, pictures, out, args.steps, False, hf_cache,
                               BUCKET_FLAGS if kind == "buckets" else [])
            results[kind].append(result)
            print(f"  {kind}: {result['steps']:.2f} steps/s", file=sys.stderr, flush=True)
    print(f"\n{sys.platform}, {os.cpu_count()} CPU(s), device {paddle.get_device()}, Paddle {paddle.__version__}, "
          f"decoder, {sum(n for _, n in PICTURES)} pictures (16:9, 1:1, 2:3), resolution 64, batch 2, "
          f"{args.steps} steps per run, median of {args.repeats}\n")
    print("| | steps/s | samples/s | pixels cropped away |\n| --- | --- | --- | --- |")
    for kind, runs in results.items():
        print(f"| {kind} | {statistics.median(r['steps'] for r in runs):.2f} | "
              f"{statistics.median(r['samples'] for r in runs):.2f} | {cropped_away(kind == 'buckets'):.0%} |")
    print(f"\ntook {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
