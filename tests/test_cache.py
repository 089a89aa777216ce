"""--cache_encoder_outputs: the same training as without it (same weights), encoder outputs reused across runs
only while models, data and preprocessing are unchanged, and an augmentation that cannot be cached is refused."""
import numpy as np
import pytest

from conftest import model_args, run_script, state_dict_of
from kandinsky_finetune.tiny_models import build_tiny_kandinsky

COMMON = ["--max_train_steps", 6, "--train_batch_size", 2, "--learning_rate", 1e-3, "--lr_warmup_steps", 0,
          "--checkpointing_steps", 100]


def max_difference(a, b):
    wa, wb = state_dict_of(a), state_dict_of(b)
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


@pytest.mark.parametrize("script,model,extra", [
    ("train_text_to_image_prior.py", "prior", []),  # list captions: the random pick happens per step, cached or not
    ("train_text_to_image_decoder.py", "unet", ["--center_crop", "--random_flip", "--noise_offset", 0.1]),
])
def test_cached_training_equals_uncached(tiny, tmp_path, script, model, extra):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf")}
    run_script(script, *model_args(tiny, tmp_path / "plain", *COMMON, *extra), env=env)
    first = run_script(script, *model_args(tiny, tmp_path / "cached", *COMMON, *extra, "--cache_encoder_outputs"),
                       env=env)
    assert "encoder-output cache: encoded 8 samples here" in first.stderr
    difference = max_difference(tmp_path / "plain" / model, tmp_path / "cached" / model)
    print(f"{script}: max |cached - uncached| = {difference:.2e}")
    assert difference < 1e-4
    again = run_script(script, *model_args(tiny, tmp_path / "again", *COMMON, *extra, "--cache_encoder_outputs"),
                       env=env)
    assert "encoder-output cache: reused" in again.stderr
    assert max_difference(tmp_path / "cached" / model, tmp_path / "again" / model) < 1e-6


def test_cache_is_rebuilt_when_models_or_preprocessing_change(tiny, tmp_path):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf")}
    args = ["--cache_encoder_outputs", "--max_train_steps", 1]  # the default centre crop of non-square images caches
    first = run_script("train_text_to_image_decoder.py", *model_args(tiny, tmp_path / "a", *args), env=env)
    assert "encoded 8 samples" in first.stderr
    # another resolution: other latents
    other_size = run_script("train_text_to_image_decoder.py", *model_args(tiny, tmp_path / "b", *args, "--resolution", 32),
                            env=env)
    assert "encoded 8 samples" in other_size.stderr
    # another MoVQ and image encoder (same architecture, other weights)
    _, other_decoder = build_tiny_kandinsky(str(tmp_path / "other"), seed=1)
    other_model = run_script("train_text_to_image_decoder.py", *model_args(tiny, tmp_path / "c", *args,
                             "--pretrained_decoder_model_name_or_path", other_decoder), env=env)
    assert "encoded 8 samples" in other_model.stderr
    same = run_script("train_text_to_image_decoder.py", *model_args(tiny, tmp_path / "d", *args), env=env)
    assert "encoder-output cache: reused" in same.stderr


def test_random_crop_of_non_square_images_trains_uncached_with_a_warning(tiny, tmp_path):
    proc = run_script("train_text_to_image_decoder.py", *model_args(
        tiny, tmp_path / "out", "--cache_encoder_outputs", "--random_crop", "--max_train_steps", 1),
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf")})
    warnings = [line for line in proc.stderr.splitlines() if "cannot be cached exactly" in line]
    assert len(warnings) == 1 and "training without the cache" in warnings[0]
    assert "encoder-output cache" not in proc.stderr
