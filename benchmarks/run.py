"""Benchmark the four training scripts on tiny Kandinsky 2.2 models, with and without --cache_encoder_outputs.

    python benchmarks/run.py [--workdir DIR] [--prior_steps 200] [--decoder_steps 30] [--peak_tflops X]
                             [--configs reference encoder-heavy] [--scripts prior prior_lora decoder decoder_lora]
                             [--cache no|yes|both] [--against REV] [--repeats N]

Each run is the real script in a subprocess (batch 2, resolution 64, fp32 unless --mixed_precision is given);
the script's own closing `time:` line gives steady-state steps/s (the first optimizer steps left out), samples/s,
peak memory (RSS on CPU, device memory on GPU) and where the time went; the benchmark samples the process's CPU
clock to give the cores it kept busy while training. Two model configurations:

- reference: prior 2 layers of 4 heads x 16, UNet channels (64, 128), MoVQ (32, 64): the configuration the
  PaddleMIX port and the PyTorch original were measured on (docs/benchmark.md, README section 11.3);
- encoder-heavy: the frozen encoders outweigh the trained model about as much as in the real Kandinsky 2.2
  (printed: the FLOP split of each configuration beside the real models').

Prints one table; on a GPU also the trained model's TFLOP/s and, with --peak_tflops, its FLOP utilisation.
With --against REV, a before/after table instead: the project at git revision REV (unpacked under --workdir) and
this tree run the same cases in turn, in one benchmark on one machine, which is the only fair comparison on machines
whose speed varies from day to day.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Each run starts from the environment the benchmark was given: importing paddle here sets OMP_NUM_THREADS=1 in this
# process, which a script would take for the user's choice (kandinsky_finetune/cpu_threads.py).
GIVEN_ENVIRONMENT = dict(os.environ)

BASE = dict(prior_layers=2, prior_heads=4, prior_head_dim=16, movq_channels=(32, 64))
CONFIGS = {
    "reference": dict(BASE, unet_channels=(64, 128)),
    "encoder-heavy": dict(BASE, unet_channels=(40, 80), image_size=64, vision_hidden=64, vision_layers=3,
                          text_layers=6),
}
SCRIPTS = ["prior", "prior_lora", "decoder", "decoder_lora"]
# Frozen encoders' forward FLOPs over the trained model's forward+backward FLOPs, per sample, real Kandinsky 2.2:
# prior (0.93 + 0.11) / 0.49 TFLOP; decoder: MoVQ encoding plus CLIP image encoder, 30-40% of the UNet's.
REAL_SPLIT = {"prior": "2.1", "decoder": "0.3-0.4"}
TIME_LINE = re.compile(r"^time: (?P<phases>[^;]*); (?P<steps>[\d.na]+) steps/s steady, (?P<samples>[\d.na]+) samples/s; "
                       r"peak RSS (?P<rss>\d+) MB(?:, peak GPU memory (?P<gpu>\d+) MB)?", re.M)


def build(workdir, name):
    from kandinsky_finetune.tiny_models import build_tiny_kandinsky, write_tiny_dataset

    root = os.path.join(workdir, name)
    if not os.path.isdir(os.path.join(root, "decoder")):
        build_tiny_kandinsky(root, **CONFIGS[name])
    data = os.path.join(workdir, "data")
    if not os.path.isdir(data):
        write_tiny_dataset(data, num_images=16, size=(96, 96))
    return os.path.join(root, "prior"), os.path.join(root, "decoder"), data


def flop_split(prior_repo, decoder_repo, resolution, batch):
    """Forward FLOPs per sample of each model (the trained ones at their training inputs)."""
    import paddle
    from ppdiffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from kandinsky_finetune.flops import forward_flops

    image = CLIPVisionModelWithProjection.from_pretrained(os.path.join(prior_repo, "image_encoder"))
    text = CLIPTextModelWithProjection.from_pretrained(os.path.join(prior_repo, "text_encoder"))
    prior = PriorTransformer.from_pretrained(os.path.join(prior_repo, "prior"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(decoder_repo, "unet"))
    movq = VQModel.from_pretrained(os.path.join(decoder_repo, "movq"))
    size, dim, factor = image.config.image_size, prior.config.embedding_dim, 2 ** (len(movq.config.block_out_channels) - 1)
    per = lambda flops: flops / batch  # noqa: E731
    return {
        "image_encoder": per(forward_flops(image, paddle.randn([batch, 3, size, size]))),
        "text_encoder": per(forward_flops(text, paddle.randint(0, 100, [batch, 77]))),
        "prior": per(forward_flops(prior, paddle.randn([batch, dim]), timestep=paddle.to_tensor([1] * batch),
                                   proj_embedding=paddle.randn([batch, dim]),
                                   encoder_hidden_states=paddle.randn([batch, 77, text.config.hidden_size]),
                                   attention_mask=paddle.ones([batch, 77], dtype="bool"))),
        "movq_encoder": per(forward_flops(movq, paddle.randn([batch, 3, resolution, resolution]),
                                           call=lambda x: movq.encode(x).latents)),
        "unet": per(forward_flops(unet, paddle.randn([batch, 4, resolution // factor, resolution // factor]),
                                  paddle.to_tensor([1] * batch), None,
                                  added_cond_kwargs={"image_embeds": paddle.randn([batch, dim])})),
    }


def run(script, prior_repo, decoder_repo, data, out, steps, cache, hf_cache, extra, tree=ROOT):
    """One training run of `tree`'s script; its `time:` line as numbers, plus `cores`: CPU time over wall time during
    training, from the process's CPU clock sampled while it runs (every thread counts, whatever the tree reports)."""
    shutil.rmtree(out, ignore_errors=True)  # each run (repeat, tree) starts afresh: a run refuses an earlier one's folder
    cmd = [sys.executable, "-u", os.path.join(tree, f"train_text_to_image_{script}.py"),
           "--pretrained_prior_model_name_or_path", prior_repo, "--pretrained_decoder_model_name_or_path", decoder_repo,
           "--train_data_dir", data, "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
           "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--seed", "0",
           "--output_dir", out, *extra]
    if script.startswith("decoder"):
        cmd.append("--center_crop")  # (the default now; kept so the command reads the same as earlier tables)
    if cache:
        cmd.append("--cache_encoder_outputs")
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=tree,
                                env={**GIVEN_ENVIRONMENT, "HF_DATASETS_CACHE": hf_cache})
        samples, process = [], psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                times = process.cpu_times()
                samples.append((time.time(), times.user + times.system))
            except psutil.Error:
                pass
            time.sleep(0.02)  # a cached tiny run trains for a fraction of a second; a /proc read costs ~20 us
        stderr.seek(0)
        text = stderr.read()
    m = TIME_LINE.search(text)
    if proc.returncode != 0 or not m:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    phases = dict((name, float(value)) for name, value in re.findall(r"([\w-]+) ([\d.]+) s", m["phases"]))
    # training ran from process start + start-up + encoding for `training` seconds (nothing pauses it here)
    start = process.create_time() + phases.get("start-up", 0) + phases.get("encoding", 0)
    return {"steps": float(m["steps"]), "samples": float(m["samples"]), "rss": int(m["rss"]),
            "gpu": int(m["gpu"]) if m["gpu"] else None,
            "cores": cores_busy(samples, start, start + phases.get("training", 0)), **phases}


def cores_busy(samples, start, end):
    """CPU seconds per wall second between `start` and `end`, from (time, cpu seconds) samples."""
    inside = [(t, c) for t, c in samples if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return float("nan")
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def checkout(rev, workdir):
    """The project's files at git revision `rev`, unpacked once under workdir (no worktree left registered)."""
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", f"{rev}^{{commit}}"], capture_output=True,
                            text=True)
    if commit.returncode != 0:
        sys.exit(f"--against {rev}: not a commit of this repository ({commit.stderr.strip()})")
    tree = os.path.join(workdir, f"tree-{commit.stdout.strip()}")
    if not os.path.isdir(tree):
        os.makedirs(tree + ".partial", exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit.stdout.strip()], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tree + ".partial"], input=archive.stdout, check=True)
        os.rename(tree + ".partial", tree)
    return tree, commit.stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "benchmark_output"))
    parser.add_argument("--prior_steps", type=int, default=200)
    parser.add_argument("--decoder_steps", type=int, default=30)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The GPU's peak TFLOP/s in the training precision, for the FLOP utilisation column.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    parser.add_argument("--cache", default="both", choices=["no", "yes", "both"],
                        help="Runs without --cache_encoder_outputs, with it, or both.")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="Compare with the project at this git revision: each run of it alternates with a run of "
                             "this tree, in the same benchmark, and the table gives both.")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Runs of each case (of each tree with --against); the table gives the median. "
                             "Default 1, or 3 with --against.")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.against else 1)
    import statistics

    import paddle

    from kandinsky_finetune.flops import TRAIN_FACTOR
    from kandinsky_finetune.tracking import quiet_libraries

    quiet_libraries()

    on_gpu = "gpu" in paddle.get_device()
    started = time.time()
    trees = [("this tree", ROOT)]
    if args.against:
        tree, commit = checkout(args.against, args.workdir)
        trees = [(commit, tree), ("this tree", ROOT)]
    caches = {"no": [False], "yes": [True], "both": [False, True]}[args.cache]
    rows, splits = [], {}
    for name in args.configs:
        prior_repo, decoder_repo, data = build(args.workdir, name)
        splits[name] = flop_split(prior_repo, decoder_repo, 64, 2)
        hf_cache = os.path.join(args.workdir, name, "hf-datasets-cache")
        for script in args.scripts:
            for cache in caches:
                steps = args.prior_steps if script.startswith("prior") else args.decoder_steps
                results = {label: [] for label, _ in trees}
                for r in range(repeats):
                    # alternate which tree goes first, so a machine that speeds up or slows down favours neither
                    for label, tree in (trees if r % 2 == 0 else trees[::-1]):
                        out = os.path.join(args.workdir, name, f"{script}-{'cached' if cache else 'uncached'}")
                        result = run(script, prior_repo, decoder_repo, data, out, steps, cache, hf_cache,
                                     ["--mixed_precision", args.mixed_precision], tree)
                        results[label].append(result)
                        print(f"  {name} {script} {'cached' if cache else 'uncached'} ({label}): "
                              f"{result['steps']:.2f} steps/s, {result['cores']:.2f} cores busy", file=sys.stderr,
                              flush=True)
                median = {label: {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
                                  for key in runs[0]} for label, runs in results.items()}
                rows.append((name, script, cache, median, results))

    print(f"\n{sys.platform}, {os.cpu_count()} CPU(s), device {paddle.get_device()}, Paddle {paddle.__version__}, "
          f"batch 2, resolution 64, {args.prior_steps} prior / {args.decoder_steps} decoder steps per run, "
          f"median of {repeats} run(s)\n")
    if args.against:
        print_comparison(rows, trees)
    else:
        print_table(rows, splits, on_gpu, args.peak_tflops, TRAIN_FACTOR)
    print("\nFLOP split per sample (frozen encoders' forward / trained model's forward+backward):")
    for name, s in splits.items():
        prior_ratio = (s["image_encoder"] + s["text_encoder"]) / (3 * s["prior"])
        decoder_ratio = (s["movq_encoder"] + s["image_encoder"]) / (3 * s["unet"])
        print(f"  {name}: prior {prior_ratio:.2f} (real {REAL_SPLIT['prior']}), decoder {decoder_ratio:.2f} "
              f"(real {REAL_SPLIT['decoder']}); forward MFLOP/sample: " +
              ", ".join(f"{k} {v / 1e6:.1f}" for k, v in s.items()))
    print(f"\nbenchmark took {time.time() - started:.0f} s")


def print_rows(table):
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for k, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def print_table(rows, splits, on_gpu, peak_tflops, train_factor):
    header = ["config", "script", "cache", "steps/s", "samples/s", "vs uncached", "cores busy", "peak MB",
              "start-up s", "encoding s", "training s", "saving s"]
    if on_gpu:
        header += ["model TFLOP/s"] + (["MFU"] if peak_tflops else [])
    table = [header]
    for name, script, cache, median, _ in rows:
        r = median["this tree"]
        base = next((m["this tree"] for n, s, c, m, _ in rows if n == name and s == script and not c), None)
        memory = r["gpu"] if r["gpu"] is not None else r["rss"]
        line = [name, script, "yes" if cache else "no", f"{r['steps']:.2f}", f"{r['samples']:.1f}",
                f"{r['steps'] / base['steps']:.2f}x" if base else "-", f"{r['cores']:.2f}", f"{memory:.0f}",
                f"{r.get('start-up', 0):.1f}", f"{r.get('encoding', 0):.1f}", f"{r.get('training', 0):.1f}",
                f"{r.get('saving', 0):.1f}"]
        if on_gpu:
            model = "prior" if script.startswith("prior") else "unet"
            factor = train_factor["lora" if script.endswith("lora") else "full"]
            tflops = factor * splits[name][model] * r["samples"] / 1e12
            line += [f"{tflops:.3f}"] + ([f"{100 * tflops / peak_tflops:.1f}%"] if peak_tflops else [])
        table.append(line)
    print_rows(table)
    print("\n(peak MB: RSS on CPU, peak device memory on GPU; cores busy: CPU time / wall time while training)")


def print_comparison(rows, trees):
    (before, _), (after, _) = trees
    table = [["config", "script", "cache", f"steps/s {before}", "steps/s this tree", "speed-up",
              f"cores busy {before}", "cores busy this tree", "steps/s of each run (before; this tree)"]]
    for name, script, cache, median, results in rows:
        b, a = median[before], median[after]
        runs = "; ".join(" ".join(f"{r['steps']:.2f}" for r in results[label]) for label in (before, after))
        table.append([name, script, "yes" if cache else "no", f"{b['steps']:.2f}", f"{a['steps']:.2f}",
                      f"{a['steps'] / b['steps']:.2f}x", f"{b['cores']:.2f}", f"{a['cores']:.2f}", runs])
    print_rows(table)
    print("\n(runs of the two trees alternate; cores busy: CPU time / wall time while training)")


if __name__ == "__main__":
    main()
