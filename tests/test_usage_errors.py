"""More input that must fail before training with one clear line: an unreachable hub for --push_to_hub, a checkpoint
written by another model or LoRA rank."""
import sys

import pytest

import train_text_to_image_decoder
import train_text_to_image_prior
import train_text_to_image_prior_lora
from conftest import ROOT, model_args, run
from kandinsky_finetune.params import UsageError


def test_push_to_hub_without_a_reachable_hub_fails_before_training(tiny, tmp_path):
    # CI has no route to the Hub: the run must stop now, not after hours of training (no token: test_hub.py)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--push_to_hub: cannot create or reach the Hugging Face repo"):
        train_text_to_image_prior.main(model_args(tiny, out, "--max_train_steps", 1, "--push_to_hub",
                                                  "--hub_token", "hf_x"))
    assert not out.exists()


def test_resume_with_another_lora_rank_is_one_clear_error(tiny, tmp_path):
    out = tmp_path / "out"
    train_text_to_image_prior_lora.main(model_args(tiny, out, "--max_train_steps", 1, "--checkpointing_steps", 1))
    with pytest.raises(UsageError, match="checkpoint-1 does not fit this run .*resume with the model, --lora_rank"):
        train_text_to_image_prior_lora.main(model_args(tiny, out, "--max_train_steps", 2, "--lora_rank", 8,
                                                       "--resume_from_checkpoint", "latest"))


def corrupt_pixel_data(png):
    """The PNG with garbage in its compressed pixel data but valid chunk checksums: it passes the up-front check
    (headers and checksums) and fails only when decoded, during training."""
    import struct
    import zlib

    out, pos = bytearray(png[:8]), 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = bytearray(png[pos + 8:pos + 8 + length])
        if kind == b"IDAT":
            body[2:] = bytes(len(body) - 2)  # keep the zlib header, zero the deflate stream
        out += struct.pack(">I4s", length, kind) + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    return bytes(out)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_fails_to_decode_is_one_clear_error_not_a_hang(tiny, tmp_path, workers):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    (data / "002.png").write_bytes(corrupt_pixel_data((data / "002.png").read_bytes()))
    proc = run([sys.executable, str(ROOT / "train_text_to_image_decoder.py"), *model_args(
        tiny, tmp_path / "out", "--train_data_dir", data, "--max_train_steps", 8, "--dataloader_num_workers", workers)],
        check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: cannot prepare row 2 of the dataset: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_sharding_stage3_with_ema_says_why_not(tiny, tmp_path):
    with pytest.raises(UsageError, match=r"^--use_ema with --sharding stage3: EMA averages the whole weights .* "
                                         r"use --sharding stage2 with --use_ema$"):
        train_text_to_image_decoder.main(model_args(tiny, tmp_path / "out", "--sharding", "stage3", "--use_ema"))
    assert not (tmp_path / "out").exists()

