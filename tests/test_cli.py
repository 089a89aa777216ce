"""The command line: defaults as in the references, a help text for every flag, no abbreviated flags."""
import pytest

import train_text_to_image_decoder
import train_text_to_image_decoder_lora
import train_text_to_image_prior
import train_text_to_image_prior_lora

SCRIPTS = {"prior": train_text_to_image_prior, "decoder": train_text_to_image_decoder,
           "prior_lora": train_text_to_image_prior_lora, "decoder_lora": train_text_to_image_decoder_lora}


def parsed(name, tmp_path, *flags):
    return SCRIPTS[name].parse_args(["--train_data_dir", str(tmp_path), *flags])


@pytest.mark.parametrize("name", SCRIPTS)
def test_output_dir_default_is_the_references(name, tmp_path):
    expected = "kandi_2_2-model-finetuned-lora" if name.endswith("lora") else "kandi_2_2-model-finetuned"
    assert parsed(name, tmp_path).output_dir == expected
