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


PRIOR = "train_text_to_image_prior.py"
DECODER = "train_text_to_image_decoder.py"
DECODER_EXTRA = ["--center_crop", "--random_flip", "--noise_offset", 0.1]


def cached_run(tiny, folder, script, *extra):
    """A run with --cache_encoder_outputs into folder/cached, its datasets cache in folder/hf: (stderr, the arguments
    that give the later runs the same datasets cache)."""
    cache = ["--cache_dir", folder / "hf"]
    proc = run_script(script, *model_args(tiny, folder / "cached", *COMMON, *extra, *cache, "--cache_encoder_outputs"))
    return proc.stderr, cache


@pytest.fixture(scope="module")
def decoder_cached(tiny, tmp_path_factory):
    """The decoder's cached run, shared by the tests below: (its folder, stderr, its --cache_dir arguments)."""
    folder = tmp_path_factory.mktemp("decoder_cache")
    return (folder, *cached_run(tiny, folder, DECODER, *DECODER_EXTRA))


def assert_equals_uncached(tiny, folder, script, model, extra, cached_stderr, cache):
    assert "encoder-output cache: encoded 8 samples here" in cached_stderr
    run_script(script, *model_args(tiny, folder / "plain", *COMMON, *extra, *cache))
    difference = max_difference(folder / "plain" / model, folder / "cached" / model)
    print(f"{script}: max |cached - uncached| = {difference:.2e}")
    assert difference < 1e-4


def assert_reused(tiny, folder, script, model, extra, cache, out):
    """A run into `out` like folder's cached one reuses its cache and trains the same weights."""
    again = run_script(script, *model_args(tiny, out, *COMMON, *extra, *cache, "--cache_encoder_outputs"))
    assert "encoder-output cache: reused" in again.stderr
    assert max_difference(folder / "cached" / model, out / model) < 1e-6


def test_cached_prior_training_equals_uncached_and_reuses_its_cache(tiny, tmp_path):
    # list captions: the random pick happens per step, cached or not
    assert_equals_uncached(tiny, tmp_path, PRIOR, "prior", [], *cached_run(tiny, tmp_path, PRIOR))
    assert_reused(tiny, tmp_path, PRIOR, "prior", [], ["--cache_dir", tmp_path / "hf"], tmp_path / "again")


def test_cached_decoder_training_equals_uncached(tiny, decoder_cached):
    folder, stderr, cache = decoder_cached
    assert_equals_uncached(tiny, folder, DECODER, "unet", DECODER_EXTRA, stderr, cache)


def test_cache_is_rebuilt_when_models_or_preprocessing_change(tiny, tmp_path, decoder_cached):
    """Runs with another resolution or other encoders encode anew; after them the first run's cache is still
    reused, and trains the same weights."""
    folder, _, cache = decoder_cached
    args = [*COMMON, *DECODER_EXTRA, *cache, "--cache_encoder_outputs", "--max_train_steps", 1]  # (the last value counts)
    # another resolution: other latents
    other_size = run_script(DECODER, *model_args(tiny, tmp_path / "b", *args, "--resolution", 32))
    assert "encoded 8 samples" in other_size.stderr
    # another MoVQ and image encoder (same architecture, other weights)
    _, other_decoder = build_tiny_kandinsky(str(tmp_path / "other"), seed=1)
    other_model = run_script(DECODER, *model_args(tiny, tmp_path / "c", *args,
                             "--pretrained_decoder_model_name_or_path", other_decoder))
    assert "encoded 8 samples" in other_model.stderr
    assert_reused(tiny, folder, DECODER, "unet", DECODER_EXTRA, cache, tmp_path / "same")


def test_random_crop_of_non_square_images_trains_uncached_with_a_warning(tiny, tmp_path):
    proc = run_script("train_text_to_image_decoder.py", *model_args(
        tiny, tmp_path / "out", "--cache_encoder_outputs", "--random_crop", "--max_train_steps", 1, "--cache_dir",
        tmp_path / "hf"))
    warnings = [line for line in proc.stderr.splitlines() if "cannot be cached exactly" in line]
    assert len(warnings) == 1 and "training without the cache" in warnings[0]
    assert "encoder-output cache" not in proc.stderr
