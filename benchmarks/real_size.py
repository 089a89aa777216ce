"""Run the training scripts at the true Kandinsky 2.2 sizes (random weights) and print memory, speed and disk.

    python benchmarks/real_size.py [--workdir DIR] [--runs prior_lora prior_cached decoder_lora decoder_cached]

Builds the real-architecture repos once (`python -m kandinsky_finetune.tiny_models DIR --size real`, about 19 GB)
and a few images, then runs each configuration for `--steps` optimizer steps at batch 1, one process at a time
(two would not fit in 24 GiB), with a checkpoint at the last step. Per run it prints: peak RSS (the stand-in for
device memory on this CPU machine), the memory plan's estimate beside it, seconds per step, where the time went
(start-up, encoding, training, saving) and the sizes on disk (GB = 1e9 bytes) of the output folder, one checkpoint and the
encoder-output cache. Never part of the test suite: a run takes minutes and most of the machine's memory.
The decoder trains at 256 px: at 512 px one CPU step takes several minutes.
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

DECODER = ["--resolution", "256", "--center_crop"]
RUNS = {  # name: (script, extra flags)
    "prior_lora": ("prior_lora", []),
    "prior_lora_cached": ("prior_lora", ["--cache_encoder_outputs"]),
    "prior_cached": ("prior", ["--cache_encoder_outputs"]),
    "decoder_lora": ("decoder_lora", DECODER),
    "decoder_lora_cached": ("decoder_lora", DECODER + ["--cache_encoder_outputs"]),
    "decoder_cached": ("decoder", DECODER + ["--cache_encoder_outputs", "--gradient_checkpointing"]),
}
TIME_LINE = re.compile(r"^time: (?P<phases>[^;]*); (?P<steps>[\d.na]+) steps/s steady.*peak RSS (?P<rss>\d+) MB", re.M)
PLAN_LINE = re.compile(r"^memory plan .*: (?P<total>[\d.]+) GB at the peak", re.M)


def folder_size(path, skip=()):
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".tmp")]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def run(name, repos, data, workdir, steps, keep):
    script, extra = RUNS[name]
    out = os.path.join(workdir, "runs", name)
    shutil.rmtree(out, ignore_errors=True)
    hf_cache = os.path.join(workdir, "hf-datasets-cache", name)
    shutil.rmtree(hf_cache, ignore_errors=True)  # every run encodes afresh, so the encoding time is measured
    cmd = [sys.executable, "-u", os.path.join(ROOT, f"train_text_to_image_{script}.py"),
           "--pretrained_prior_model_name_or_path", repos[0], "--pretrained_decoder_model_name_or_path", repos[1],
           "--train_data_dir", data, "--train_batch_size", "1", "--max_train_steps", str(steps),
           "--checkpointing_steps", str(steps), "--lr_warmup_steps", "0", "--seed", "0", "--output_dir", out, *extra]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_CACHE": hf_cache})
    with open(os.path.join(workdir, f"{name}.log"), "w") as f:
        f.write(proc.stderr)
    m, plan = TIME_LINE.search(proc.stderr), PLAN_LINE.search(proc.stderr)
    if proc.returncode != 0 or not m:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    phases = dict((k, float(v)) for k, v in re.findall(r"([\w-]+) ([\d.]+) s", m["phases"]))
    checkpoint = os.path.join(out, f"checkpoint-{steps}")
    row = {"name": name, "rss": int(m["rss"]) * 2 ** 20 / 1e9, "plan": float(plan["total"]) if plan else None,
           "s_per_step": 1 / float(m["steps"]) if float(m["steps"]) > 0 else float("nan"), **phases,
           "wall": time.time() - start,
           "output": folder_size(out, skip=("logs", "validation", f"checkpoint-{steps}")) / 1e9,
           "linked": re.search(r"([\d.]+) (GB|MB) hard-linked", proc.stderr),
           "checkpoint": folder_size(checkpoint) / 1e9, "cache": folder_size(hf_cache) / 1e9}
    linked = row["linked"]
    row["linked"] = float(linked.group(1)) / (1000 if linked.group(2) == "MB" else 1) if linked else 0.0
    if not keep:  # a full fine-tune's output and checkpoint are 15-20 GB: make room for the next run
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(hf_cache, ignore_errors=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/kandinsky-real-size")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--keep_outputs", action="store_true", help="Keep each run's output folder (else deleted "
                        "once measured: a full fine-tune's output and checkpoint take 15-20 GB).")
    args = parser.parse_args()
    import paddle

    from kandinsky_finetune.tiny_models import build_real_kandinsky, write_tiny_dataset

    repos = os.path.join(args.workdir, "repos")
    if not os.path.isfile(os.path.join(repos, "decoder", "model_index.json")):
        build_real_kandinsky(repos)
    repos = (os.path.join(repos, "prior"), os.path.join(repos, "decoder"))
    data = os.path.join(args.workdir, "data")
    if not os.path.isdir(data):
        write_tiny_dataset(data, num_images=args.images, size=(320, 256))
    rows = []
    for name in args.runs:
        rows.append(run(name, repos, data, args.workdir, args.steps, args.keep_outputs))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n{os.cpu_count()} CPU(s), Paddle {paddle.__version__}, batch 1, {args.images} images, {args.steps} steps, "
          f"fp32; decoder runs at 256 px\n")
    print("| run | peak RSS GB | plan GB | plan / peak | s/step | start-up s | encoding s | saving s | output GB "
          "(of it linked) | checkpoint GB | cache GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |")
            continue
        ratio = f"{r['plan'] / r['rss']:.2f}" if r["plan"] else "-"
        print(f"| {r['name']} | {r['rss']:.1f} | {r['plan'] or '-'} | {ratio} | {r['s_per_step']:.0f} | "
              f"{r.get('start-up', 0):.0f} | {r.get('encoding', 0):.0f} | {r.get('saving', 0):.0f} | "
              f"{r['output']:.2f} ({r['linked']:.2f}) | {r['checkpoint']:.2f} | {r['cache']:.4f} |")


if __name__ == "__main__":
    main()
