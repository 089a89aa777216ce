"""The command line: defaults as in the references, a help text for every flag, no abbreviated flags."""
from types import SimpleNamespace

import pytest

import train_text_to_image_decoder
import train_text_to_image_decoder_lora
import train_text_to_image_prior
import train_text_to_image_prior_lora
from kandinsky_finetune import validation
from kandinsky_finetune.params import UsageError

SCRIPTS = {"prior": train_text_to_image_prior, "decoder": train_text_to_image_decoder,
           "prior_lora": train_text_to_image_prior_lora, "decoder_lora": train_text_to_image_decoder_lora}


def parsed(name, tmp_path, *flags):
    return SCRIPTS[name].parse_args(["--train_data_dir", str(tmp_path), *flags])


@pytest.mark.parametrize("name", SCRIPTS)
def test_output_dir_default_is_the_references(name, tmp_path):
    expected = "kandi_2_2-model-finetuned-lora" if name.endswith("lora") else "kandi_2_2-model-finetuned"
    assert parsed(name, tmp_path).output_dir == expected


class FakePipe:
    """Records the keyword arguments of each call, as a KandinskyV22CombinedPipeline would receive them."""

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, **kwargs):
        from PIL import Image

        self.calls.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))] * kwargs["num_images_per_prompt"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_validation_steps_default_to_the_references_and_reach_prior_and_decoder(name, tmp_path):
    prompt = "--validation_prompt" if name.endswith("lora") else "--validation_prompts"
    expected = 30 if name.endswith("lora") else 20
    for flags, steps in [([], expected), (["--num_inference_steps", "3"], 3)]:
        args = parsed(name, tmp_path, prompt, "a red picture", "--output_dir", str(tmp_path / "out"), *flags)
        pipe = FakePipe()
        validation.run(pipe, [], args, 0, 1, SimpleNamespace(images=lambda *a: None, image=lambda *a: None),
                       lambda line: None)
        assert pipe.calls and all(call["num_inference_steps"] == call["prior_num_inference_steps"] == steps
                                  for call in pipe.calls), (flags, pipe.calls)
    with pytest.raises(UsageError, match="--num_inference_steps must be at least 1"):
        parsed(name, tmp_path, "--num_inference_steps", "0")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_a_help_text_and_help_shows_defaults(name, capsys):
    parser = SCRIPTS[name].build_parser()
    missing = [action.option_strings for action in parser._actions if not (action.help or "").strip()]
    assert not missing, f"flags without a help text: {missing}"
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].parse_args(["--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also at hyphens)
    assert "--learning_rateLEARNING_RATEPeaklearningrateofAdamW(reachedafterthewarm-up).(default:0.0001)" in text
    assert "(default:None)" not in text and "(default:False)" not in text  # nothing to show for those


@pytest.mark.parametrize("name", SCRIPTS)
def test_an_abbreviated_flag_is_an_error_not_taken_for_the_full_one(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parsed(name, tmp_path, "--max_train_step=3")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: unrecognized arguments: --max_train_step=3" in err
