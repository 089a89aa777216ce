"""Offline demo: tiny random Kandinsky 2.2 repos, a tiny captioned dataset, a few steps of prior and decoder
fine-tuning with the real scripts, then a generated image from the fine-tuned pair. No network, no GPU.

    python -m kandinsky_finetune.demo [--workdir demo_output] [--steps 30]
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The environment the demo was started in, for the training commands: building the tiny models imports paddle, which
# sets OMP_NUM_THREADS=1 in this process, and the scripts would take that for the user's choice (cpu_threads.py). The
# commands then run as the user pasting them would run them.
STARTED_WITH = dict(os.environ)


def train(script, workdir, repos, dataset, output_dir, steps):
    prior_repo, decoder_repo = repos
    cmd = [sys.executable, "-u", os.path.join(ROOT, script),
           f"--pretrained_prior_model_name_or_path={prior_repo}", f"--pretrained_decoder_model_name_or_path={decoder_repo}",
           f"--train_data_dir={dataset}", "--resolution=64", "--train_batch_size=2", f"--max_train_steps={steps}",
           "--learning_rate=1e-3", "--lr_warmup_steps=0", f"--checkpointing_steps={steps}", "--seed=0",
           f"--output_dir={output_dir}"]
    print("$ " + shlex.join(["python", *cmd[1:]]), flush=True)  # a command a user can paste
    subprocess.run(cmd, check=True, cwd=workdir, env=STARTED_WITH)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_output")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    start = time.time()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)

    from .tiny_models import build_tiny_kandinsky, write_tiny_dataset

    repos = build_tiny_kandinsky(os.path.join(workdir, "tiny-kandinsky"))
    dataset = write_tiny_dataset(os.path.join(workdir, "tiny-dataset"))
    print(f"tiny repos in {os.path.dirname(repos[0])}, dataset in {dataset}", flush=True)
    prior_out, decoder_out = os.path.join(workdir, "prior-finetuned"), os.path.join(workdir, "decoder-finetuned")
    for folder in prior_out, decoder_out:  # a demo run again starts over (its repos above are new random ones)
        if os.path.isdir(folder):
            print(f"removing the previous demo's {folder}", flush=True)
            shutil.rmtree(folder)
    train("train_text_to_image_prior.py", workdir, repos, dataset, prior_out, args.steps)
    train("train_text_to_image_decoder.py", workdir, repos, dataset, decoder_out, args.steps)

    import paddle
    from ppdiffusers import DiffusionPipeline, KandinskyV22CombinedPipeline

    # exactly the README's recipe: fine-tuned prior components into the fine-tuned decoder's pipeline
    pipe_prior = DiffusionPipeline.from_pretrained(prior_out)
    prior_components = {"prior_" + k: v for k, v in pipe_prior.components.items()}
    pipe = KandinskyV22CombinedPipeline.from_pretrained(decoder_out, **prior_components)
    image = pipe(prompt="a red picture", height=256, width=256, generator=paddle.Generator().manual_seed(0)).images[0]
    path = os.path.join(workdir, "demo.png")
    image.save(path)
    print(f"generated {path} ({image.size[0]}x{image.size[1]}) in {time.time() - start:.0f} s in all; the models are "
          "random and tiny, so the picture is noise: the demo shows the whole path runs, not what fine-tuning gives")


if __name__ == "__main__":
    main()
