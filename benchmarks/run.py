"""Benchmark the four training scripts on tiny Kandinsky 2.2 models, with and without --cache_encoder_outputs.

    python benchmarks/run.py [--workdir DIR] [--prior_steps 200] [--decoder_steps 30] [--peak_tflops X]
                             [--configs reference encoder-heavy] [--scripts prior prior_lora decoder decoder_lora]

Each run is the real script in a subprocess (batch 2, resolution 64, fp32 unless --mixed_precision is given);
the script's own closing `time:` line gives steady-state steps/s (the first optimizer steps left out), samples/s,
peak memory (RSS on CPU, device memory on GPU) and where the time went. Two model configurations:

- reference: prior 2 layers of 4 heads x 16, UNet channels (64, 128), MoVQ (32, 64): the configuration the
  PaddleMIX port and the PyTorch original were measured on (figures below, from this project's 2-core machines);
- encoder-heavy: the frozen encoders outweigh the trained model about as much as in the real Kandinsky 2.2
  (printed: the FLOP split of each configuration beside the real models').

Prints one table; on a GPU also the trained model's TFLOP/s and, with --peak_tflops, its FLOP utilisation.
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
# Uncached steps/s on the reference configuration, measured on this project's 2-core CPU machines.
OTHERS = {"prior": {"PyTorch original": 72.0, "PaddleMIX port": 0.49 * 72.0},
          "decoder": {"PyTorch original": 5.4, "PaddleMIX port": 0.19 * 5.4}}
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


def run(script, prior_repo, decoder_repo, data, out, steps, cache, hf_cache, extra):
    cmd = [sys.executable, "-u", os.path.join(ROOT, f"train_text_to_image_{script}.py"),
           "--pretrained_prior_model_name_or_path", prior_repo, "--pretrained_decoder_model_name_or_path", decoder_repo,
           "--train_data_dir", data, "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
           "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--seed", "0",
           "--output_dir", out, *extra]
    if script.startswith("decoder"):
        cmd.append("--center_crop")  # (the default now; kept so the command reads the same as earlier tables)
    if cache:
        cmd.append("--cache_encoder_outputs")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_CACHE": hf_cache})
    m = TIME_LINE.search(proc.stderr)
    if proc.returncode != 0 or not m:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases = dict((name, float(value)) for name, value in re.findall(r"([\w-]+) ([\d.]+) s", m["phases"]))
    return {"steps": float(m["steps"]), "samples": float(m["samples"]), "rss": int(m["rss"]),
            "gpu": int(m["gpu"]) if m["gpu"] else None, **phases}


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
    args = parser.parse_args()
    import paddle

    from kandinsky_finetune.flops import TRAIN_FACTOR
    from kandinsky_finetune.tracking import quiet_libraries

    quiet_libraries()

    on_gpu = "gpu" in paddle.get_device()
    started = time.time()
    rows, splits = [], {}
    for name in args.configs:
        prior_repo, decoder_repo, data = build(args.workdir, name)
        splits[name] = flop_split(prior_repo, decoder_repo, 64, 2)
        hf_cache = os.path.join(args.workdir, name, "hf-datasets-cache")
        for script in args.scripts:
            for cache in (False, True):
                steps = args.prior_steps if script.startswith("prior") else args.decoder_steps
                out = os.path.join(args.workdir, name, f"{script}-{'cached' if cache else 'uncached'}")
                result = run(script, prior_repo, decoder_repo, data, out, steps, cache, hf_cache,
                             ["--mixed_precision", args.mixed_precision])
                rows.append((name, script, cache, result))
                print(f"  {name} {script} {'cached' if cache else 'uncached'}: {result['steps']:.2f} steps/s",
                      file=sys.stderr, flush=True)

    print(f"\n{sys.platform}, {os.cpu_count()} CPU(s), device {paddle.get_device()}, Paddle {paddle.__version__}, "
          f"batch 2, resolution 64, {args.prior_steps} prior / {args.decoder_steps} decoder steps per run\n")
    header = ["config", "script", "cache", "steps/s", "samples/s", "vs uncached", "peak MB", "start-up s", "encoding s",
              "training s", "saving s"]
    if on_gpu:
        header += ["model TFLOP/s"] + (["MFU"] if args.peak_tflops else [])
    table = [header]
    for name, script, cache, r in rows:
        base = next(x for n, s, c, x in rows if n == name and s == script and not c)
        memory = r["gpu"] if r["gpu"] is not None else r["rss"]
        line = [name, script, "yes" if cache else "no", f"{r['steps']:.2f}", f"{r['samples']:.1f}",
                f"{r['steps'] / base['steps']:.2f}x", str(memory), f"{r.get('start-up', 0):.1f}",
                f"{r.get('encoding', 0):.1f}", f"{r.get('training', 0):.1f}", f"{r.get('saving', 0):.1f}"]
        if on_gpu:
            model = "prior" if script.startswith("prior") else "unet"
            factor = TRAIN_FACTOR["lora" if script.endswith("lora") else "full"]
            tflops = factor * splits[name][model] * r["samples"] / 1e12
            line += [f"{tflops:.3f}"] + ([f"{100 * tflops / args.peak_tflops:.1f}%"] if args.peak_tflops else [])
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n(peak MB: RSS on CPU, peak device memory on GPU)\n\nFLOP split per sample (frozen encoders' forward / "
          "trained model's forward+backward):")
    for name, s in splits.items():
        prior_ratio = (s["image_encoder"] + s["text_encoder"]) / (3 * s["prior"])
        decoder_ratio = (s["movq_encoder"] + s["image_encoder"]) / (3 * s["unet"])
        print(f"  {name}: prior {prior_ratio:.2f} (real {REAL_SPLIT['prior']}), decoder {decoder_ratio:.2f} "
              f"(real {REAL_SPLIT['decoder']}); forward MFLOP/sample: " +
              ", ".join(f"{k} {v / 1e6:.1f}" for k, v in s.items()))
    print("\nUncached steps/s on the reference configuration, against the other implementations "
          "(measured on this project's 2-core CPU machines):")
    for script in ("prior", "decoder"):
        ours = next((r for n, s, c, r in rows if n == "reference" and s == script and not c), {}).get("steps")
        if ours is None:
            continue
        print(f"  {script}: this project {ours:.2f}; " +
              "; ".join(f"{k} {v:.2f} (ours {ours / v:.2f}x)" for k, v in OTHERS[script].items()))
    print(f"\nbenchmark took {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
