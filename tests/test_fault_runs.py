"""The real scripts under faults: a diverging loss, kill -9 at random moments, SIGTERM (one process and a
2-process launch), a rank that dies. Runs are tiny and shared where they can be."""
import glob
import os
import re

import numpy as np

from conftest import model_args, run_script


def saved_tensors(folder):
    """Every weights file under `folder` (checkpoints and final save), as {path: {name: array}}."""
    from safetensors.numpy import load_file

    return {f: load_file(f) for f in glob.glob(os.path.join(str(folder), "**", "*.safetensors"), recursive=True)}


def test_divergence_stops_with_one_line_and_saves_nothing_non_finite(tiny, tmp_path):
    out = tmp_path / "out"
    # A learning rate of 1e20 (no clipping) makes step 1's weights huge, so step 2's loss is nan
    proc = run_script("train_text_to_image_decoder.py", *model_args(
        tiny, out, "--max_train_steps", 6, "--checkpointing_steps", 1, "--train_batch_size", 2, "--learning_rate", 1e20,
        "--max_grad_norm", 0, "--lr_warmup_steps", 0), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: step (\d+): the loss is nan: training diverged; stopped before this optimizer step "
                        r"and saved nothing from it \(try a lower --learning_rate, or --max_grad_norm\)", last), last
    step = int(re.search(r"step (\d+)", last).group(1))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [
        f"checkpoint-{k}" for k in range(1, step)]
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    tensors = saved_tensors(out)
    assert tensors and all(np.isfinite(v).all() for weights in tensors.values() for v in weights.values())
