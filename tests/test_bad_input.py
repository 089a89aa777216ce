"""Bad input: one clear line naming the problem, exit status 2, before training, and nothing written."""
import json
import os
import shutil
import sys

import pytest

import train_text_to_image_decoder
import train_text_to_image_decoder_lora
import train_text_to_image_prior
import train_text_to_image_prior_lora
from conftest import ROOT, model_args, run
from kandinsky_finetune import models
from kandinsky_finetune.params import UsageError
from kandinsky_finetune.tiny_models import build_tiny_kandinsky


def copy_dataset(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny.data, data)
    return data


def case_missing_dir(tiny, tmp_path):
    return ["--train_data_dir", tmp_path / "nowhere"], "is not a folder"


def case_empty_dir(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--train_data_dir", tmp_path / "empty"], "doesn't contain any data files"


def case_missing_hub_dataset(tiny, tmp_path):
    return ["--train_data_dir", None, "--dataset_name", tmp_path / "no" / "such"], "cannot load dataset"


def case_wrong_image_column(tiny, tmp_path):
    return ["--image_column", "picture"], "has no column 'picture' (--image_column)"


def case_unreadable_image(tiny, tmp_path):
    data = copy_dataset(tiny, tmp_path)
    (data / "003.png").write_bytes(b"this is not a png")
    return ["--train_data_dir", data], "unreadable image"


def case_image_without_row(tiny, tmp_path):
    data = copy_dataset(tiny, tmp_path)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # 005.png keeps its file
    return ["--train_data_dir", data], "image at 005.png doesn't have metadata in"


def case_row_without_image(tiny, tmp_path):
    data = copy_dataset(tiny, tmp_path)
    (data / "005.png").unlink()  # its row stays
    return ["--train_data_dir", data], "metadata.jsonl, line 6: image file 005.png does not exist in"


def case_duplicate_row(tiny, tmp_path):
    data = copy_dataset(tiny, tmp_path)
    with open(data / "metadata.jsonl", "a") as f:  # imagefolder keeps the last row of an image, without a word
        f.write(json.dumps({"file_name": "002.png", "text": ["another caption"]}) + "\n")
    return ["--train_data_dir", data], "metadata.jsonl, line 9: 002.png has a row already (line 3)"


def case_empty_metadata(tiny, tmp_path):
    data = copy_dataset(tiny, tmp_path)
    (data / "metadata.jsonl").write_text("")
    return ["--train_data_dir", data], "metadata.jsonl is empty"


def case_model_without_subfolders(tiny, tmp_path):
    fake = tmp_path / "fake_repo"
    shutil.copytree(os.path.join(tiny.decoder, "unet"), fake / "unet")
    shutil.copytree(os.path.join(tiny.prior, "prior"), fake / "prior")
    return ["--pretrained_decoder_model_name_or_path", fake, "--pretrained_prior_model_name_or_path", fake], \
        "missing subfolder(s)"


def case_output_dir_is_file(tiny, tmp_path):
    return ["--output_dir", tmp_path / "out"], "is a file"


CASES = [case_missing_dir, case_empty_dir, case_missing_hub_dataset, case_wrong_image_column, case_unreadable_image,
         case_image_without_row, case_row_without_image, case_duplicate_row, case_empty_metadata,
         case_model_without_subfolders, case_output_dir_is_file]


def with_overrides(args, overrides):
    """model_args with some flags replaced (a None value drops the flag)."""
    args = list(map(str, args))
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        if value is not None:
            args += [flag, str(value)]
    return args


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
@pytest.mark.parametrize("script", [train_text_to_image_prior, train_text_to_image_decoder,
                                    train_text_to_image_prior_lora, train_text_to_image_decoder_lora],
                         ids=["prior", "decoder", "prior_lora", "decoder_lora"])
def test_bad_input_is_one_clear_error_before_training(tiny, tmp_path, script, case):
    overrides, expected = case(tiny, tmp_path)
    out = tmp_path / "out"
    if case is case_output_dir_is_file:
        out.write_text("not a folder")
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        script.main(with_overrides(model_args(tiny, out), overrides))
    assert out.is_file() if case is case_output_dir_is_file else not out.exists()


@pytest.mark.parametrize("script", [train_text_to_image_prior, train_text_to_image_prior_lora],
                         ids=["prior", "prior_lora"])
def test_prior_caption_problems(tiny, tmp_path, script):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="no column 'caption' \\(--caption_column\\)"):
        script.main(model_args(tiny, out, "--caption_column", "caption"))
    data = copy_dataset(tiny, tmp_path)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('["a blue picture"]', "[]")
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match="row 2: a caption must be a string or a non-empty list"):
        script.main(with_overrides(model_args(tiny, out), ["--train_data_dir", data]))
    assert not out.exists()


@pytest.mark.parametrize("decoder_script,prior_script,prompt_flag", [
    (train_text_to_image_decoder, train_text_to_image_prior, "--validation_prompts"),
    (train_text_to_image_decoder_lora, train_text_to_image_prior_lora, "--validation_prompt"),
], ids=["full", "lora"])
def test_resolution_not_multiple_of_movq_factor(tiny, tmp_path, decoder_script, prior_script, prompt_flag):
    with pytest.raises(UsageError, match="--resolution 60 is not a multiple of the MoVQ downscale factor 8"):
        decoder_script.main(with_overrides(model_args(tiny, tmp_path / "out"), ["--resolution", 60]))
    # the prior uses --resolution for its validation images, made by the decoder
    with pytest.raises(UsageError, match="--resolution 60 is not a multiple of the MoVQ downscale factor 8"):
        prior_script.main(with_overrides(model_args(tiny, tmp_path / "out"),
                                         ["--resolution", 60, prompt_flag, "a cat"]))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def other_decoder(tmp_path_factory):
    """A decoder whose UNet takes 48-dim image embeddings; the tiny prior makes 32-dim ones."""
    return build_tiny_kandinsky(str(tmp_path_factory.mktemp("other")), embed_dim=48)[1]


def mismatch_error(tiny, decoder_repo):
    return (f"the prior and the decoder do not belong together: --pretrained_prior_model_name_or_path {tiny.prior} "
            f"makes 32-dim image embeddings (image_encoder projection_dim), the UNet of "
            f"--pretrained_decoder_model_name_or_path {decoder_repo} takes 48-dim ones (unet encoder_hid_dim)")


class WeightsLoaded(Exception):
    pass


@pytest.mark.parametrize("script,extra", [
    (train_text_to_image_decoder, []), (train_text_to_image_decoder_lora, []),
    (train_text_to_image_prior, ["--validation_prompts", "a cat"]),  # validation turns the prior's output into images
    (train_text_to_image_prior_lora, ["--validation_prompt", "a cat"]),
    (train_text_to_image_prior, []),  # no validation: the decoder is not used
], ids=["decoder", "decoder_lora", "prior", "prior_lora", "prior_without_validation"])
def test_a_prior_and_a_decoder_that_do_not_belong_together(tiny, tmp_path, other_decoder, monkeypatch, script, extra):
    def load(*args, **kwargs):
        raise WeightsLoaded

    monkeypatch.setattr(models, "load", load)
    args = with_overrides(model_args(tiny, tmp_path / "out", *extra),
                          ["--pretrained_decoder_model_name_or_path", other_decoder])
    if not extra and script is train_text_to_image_prior:
        with pytest.raises(WeightsLoaded):
            script.main(args)
        return
    with pytest.raises(UsageError) as error:  # from the config files, before any weights load
        script.main(args)
    assert str(error.value) == mismatch_error(tiny, other_decoder)
    assert not (tmp_path / "out").exists()


def test_a_mismatched_pair_is_one_error_line(tiny, tmp_path, other_decoder):
    """The command line as a user runs it (no spy on loading): one `error:` line, status 2 (the other scripts' same
    check: in process, above)."""
    args = with_overrides(model_args(tiny, tmp_path / "out"), ["--pretrained_decoder_model_name_or_path", other_decoder])
    proc = run([sys.executable, str(ROOT / "train_text_to_image_decoder.py"), *args], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: " + mismatch_error(tiny, other_decoder)


def test_cli_prints_one_error_line_and_exits_2(tiny, tmp_path):
    proc = run([sys.executable, str(ROOT / "train_text_to_image_decoder.py"),
                *with_overrides(model_args(tiny, tmp_path / "out"), ["--image_column", "picture"])], check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset ")


# In process: params.run turns the UsageError into the one `error:` line (test_cli_prints_one_error_line_and_exits_2)
def error_of(main, args, capfd):
    """The message main(args) stops with; nothing on stderr may be a traceback (a library's logged one)."""
    with pytest.raises(UsageError) as error:
        main(args)
    assert "Traceback" not in capfd.readouterr().err
    return str(error.value)


@pytest.mark.parametrize("case,script", [(case_image_without_row, train_text_to_image_prior),
                                         (case_row_without_image, train_text_to_image_decoder)],
                         ids=["image_without_row", "row_without_image"])
def test_image_and_metadata_out_of_step_is_one_error_line_naming_the_file(tiny, tmp_path, case, script, capfd):
    # datasets reports the first as "An error occurred while generating the dataset", and drops the second's row
    overrides, expected = case(tiny, tmp_path)
    message = error_of(script.main, with_overrides(model_args(tiny, tmp_path / "out"), overrides), capfd)
    assert expected in message and "005.png" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,script", [(case_duplicate_row, train_text_to_image_prior),
                                         (case_empty_metadata, train_text_to_image_decoder)],
                         ids=["duplicate_row", "empty_metadata"])
def test_a_local_folder_as_dataset_name_is_checked_like_train_data_dir(tiny, tmp_path, case, script, capfd):
    """--dataset_name given a local image folder is read as --train_data_dir's is: one line naming the file."""
    overrides, expected = case(tiny, tmp_path)
    data = overrides[overrides.index("--train_data_dir") + 1]
    args = with_overrides(model_args(tiny, tmp_path / "out"), ["--train_data_dir", None, "--dataset_name", data])
    message = error_of(script.main, args, capfd)
    assert message.startswith(f"{data / 'metadata.jsonl'}") and expected in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


def test_8bit_adam_is_refused_with_a_reason(tiny, tmp_path):
    with pytest.raises(UsageError, match="bitsandbytes"):
        train_text_to_image_prior.main(model_args(tiny, tmp_path / "out", "--use_8bit_adam"))
