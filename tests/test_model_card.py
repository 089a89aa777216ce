"""Every final output carries a model card (README.md with YAML front matter) and the last validation grid, written
in the same atomic save as the model; the card's loading code runs as written."""
import glob
import os
import re
import sys

import pytest
import yaml

import train_text_to_image_decoder
import train_text_to_image_decoder_lora
import train_text_to_image_prior
import train_text_to_image_prior_lora
from conftest import run
from kandinsky_finetune import checkpoint_files, model_card
from kandinsky_finetune.faults import RunError

PRIOR, DECODER = "kandinsky-community/kandinsky-2-2-prior", "kandinsky-community/kandinsky-2-2-decoder"
DATASET = "lambdalabs/naruto-blip-captions"
TAGS = ["kandinsky", "text-to-image", "ppdiffusers", "paddlepaddle"]
COMMON = {"license": "apache-2.0", "library_name": "ppdiffusers", "pipeline_tag": "text-to-image", "inference": False}
SCRIPTS = {  # script: (its module, LoRA?, its validation flags, images per prompt)
    "decoder": (train_text_to_image_decoder, False, ["--validation_prompts", "a red picture", "a blue picture"], 1),
    "prior": (train_text_to_image_prior, False, ["--validation_prompts", "a red picture", "a blue picture"], 1),
    "decoder_lora": (train_text_to_image_decoder_lora, True, ["--validation_prompt", "a red picture",
                                                              "--num_validation_images", "2"], 2),
    "prior_lora": (train_text_to_image_prior_lora, True, ["--validation_prompt", "a red picture",
                                                          "--num_validation_images", "2"], 2),
}


@pytest.fixture(scope="module")
def user_folder(tiny, tmp_path_factory):
    """A folder where the hub ids a user types are the tiny repos and dataset (as in test_readme.py)."""
    folder = tmp_path_factory.mktemp("card_user")
    for name, target in ((PRIOR, tiny.prior), (DECODER, tiny.decoder), (DATASET, tiny.data)):
        os.makedirs(folder / os.path.dirname(name), exist_ok=True)
        os.symlink(target, folder / name)
    return folder


def front_matter(card):
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_output_has_a_card_whose_loading_code_runs(script, user_folder, monkeypatch, capsys):
    module, lora, validation_flags, per_prompt = SCRIPTS[script]
    kind = script.split("_")[0]
    monkeypatch.chdir(user_folder)
    out = user_folder / f"out-{script}"
    module.main(["--dataset_name", DATASET, "--resolution", "64", "--seed", "0", "--output_dir", out.name,
                 "--max_train_steps", "1", "--checkpointing_steps", "1", "--num_inference_steps", "2",
                 *validation_flags])
    card = (out / "README.md").read_text(encoding="utf-8")
    saved = re.search(r"saved .*, with its model card \(README.md\)", capsys.readouterr().err)
    assert saved, "no 'saved' line"
    if not lora:  # what cost new bytes, what is linked
        assert re.search(r"\(\d+\.\d+ MB written, \d+\.\d+ MB hard-linked from the source repos\)", saved.group(0))

    # the repos and the dataset are local folders named like hub ids: no base_model, prior or datasets entry
    assert front_matter(card) == {**COMMON, "tags": TAGS + (["lora"] if lora else [])}

    # the last validation grid beside the card, a row per prompt; checkpoints get neither
    grid = out / model_card.GRID
    assert grid.read_bytes() == (out / "validation" / "step-1" / "grid.png").read_bytes()
    from PIL import Image

    width, height = Image.open(grid).size
    prompts = validation_flags[1:3] if not lora else ["a red picture"]
    assert width == 64 * per_prompt and height > 64 * len(prompts)
    assert f"![validation images]({model_card.GRID})" in card
    assert all(f"- row {k}: {p}\n" in card for k, p in enumerate(prompts, 1))  # (a grid may show "row k" alone)
    assert not {"README.md", model_card.GRID} & set(os.listdir(out / "checkpoint-1"))
    assert f"python -u train_text_to_image_{script}.py --dataset_name {DATASET}" in card
    # and the tracker got the grid as one image, beside the single ones
    from visualdl import LogReader

    (log,) = glob.glob(str(out / "logs" / "*" / "vdlrecords*"))
    assert {"validation_grid", "validation/0"} <= set(LogReader(file_path=log).get_tags()["image"])

    # the card's Python lines load this output (and the repos it was trained from) and make an image
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'"{out.name}"' in code
    (user_folder / f"card_{script}.py").write_text(code)
    run([sys.executable, f"card_{script}.py"], cwd=user_folder)
    assert os.path.isfile(user_folder / "example.png")
    os.remove(user_folder / "example.png")


def test_the_card_hides_hub_tokens():
    line = model_card.command_line("prior", True, ["--hub_token", "hf_secret", "--aistudio_token=as_secret",
                                                   "--validation_prompt", "a red picture"])
    assert "secret" not in line
    assert line == ("python -u train_text_to_image_prior_lora.py --hub_token '<token>' '--aistudio_token=<token>' "
                    "--validation_prompt 'a red picture'")


def test_local_folders_are_not_written_as_hub_ids(tmp_path, monkeypatch):
    """The Hugging Face Hub rejects a card whose base_model is not a model id: a local folder is named in the text
    only, even one named like a hub id (from_pretrained reads the folder, not the hub)."""
    monkeypatch.chdir(tmp_path)
    assert model_card.hub_id("kandinsky-community/kandinsky-2-2-prior") == "kandinsky-community/kandinsky-2-2-prior"
    assert model_card.hub_id("a/b") == "a/b"
    (tmp_path / "a" / "b").mkdir(parents=True)
    for local in ("a/b", "/data/models/prior", "./prior", "models/kandinsky/prior", None):
        assert model_card.hub_id(local) is None


@pytest.mark.parametrize("kind,lora", [("decoder", False), ("prior", False), ("decoder", True), ("prior", True)])
def test_the_metadata_of_an_output_trained_from_hub_repos(tmp_path, monkeypatch, kind, lora):
    """Base model, the decoder's prior, the dataset; the library that loads it and the task, for the hubs' filters;
    no hosted inference widget, which cannot run a ppdiffusers model."""
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)  # where no folder is named like the hub ids
    args = SimpleNamespace(pretrained_prior_model_name_or_path=PRIOR, pretrained_decoder_model_name_or_path=DECODER,
                           dataset_name=DATASET)
    assert yaml.safe_load(model_card.front_matter(args, kind, lora)) == {
        **COMMON, "base_model": [DECODER if kind == "decoder" else PRIOR],
        **({"prior": [PRIOR]} if kind == "decoder" else {}),  # a prior output is itself a prior
        "datasets": [DATASET], "tags": TAGS + (["lora"] if lora else [])}


def test_an_interrupted_final_save_leaves_neither_a_card_nor_a_model(tmp_path, monkeypatch):
    """The card is written inside checkpoint_files.publish's temporary folder: a failure while writing it publishes
    nothing, so output_dir never has a card without its model (or a model without its card)."""
    from types import SimpleNamespace

    def save(folder):
        (open(os.path.join(folder, "paddle_lora_weights.safetensors"), "wb")).close()
        return "weights"

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_card, "write", full_disk)
    run_ = SimpleNamespace(kind="prior", lora=True, ctx=SimpleNamespace(world_size=1), seed=0)
    with pytest.raises(RunError, match="No space left on device"):
        checkpoint_files.publish(str(tmp_path), model_card.with_card(save, SimpleNamespace(output_dir=str(tmp_path)), run_, 1))
    assert os.listdir(tmp_path) == []


def test_a_prompt_no_font_has_is_captioned_with_its_row():
    """Pillow's own font has no Chinese (its prompts came out as boxes): where no font found has the characters, the
    row is captioned "row <k>" (the card lists each row's prompt: test_each_output_has_a_card...)."""
    from PIL import Image

    from kandinsky_finetune import validation

    images = [Image.new("RGB", (128, 128), "gray")] * 2
    picture = validation.grid(images, ["一只猫", "a cat"], 1, font_folders=[])  # no font files: no Chinese
    assert picture.tobytes() == validation.grid(images, ["row 1", "a cat"], 1, font_folders=[]).tobytes()


def test_a_font_found_with_the_characters_draws_the_prompt():
    """Where a font on this machine has them (Noto Sans CJK, WenQuanYi, ...), the prompt itself is drawn."""
    from PIL import Image, ImageFont

    from kandinsky_finetune import validation

    font = validation.caption_font(("一只猫",), validation.FONT_FOLDERS)
    if font.getname() == ImageFont.load_default().getname():
        pytest.skip("no font with Chinese characters on this machine")
    assert validation.has_glyphs(font, "一只猫") and not validation.has_glyphs(ImageFont.load_default(), "一只猫")
    images = [Image.new("RGB", (128, 128), "gray")]
    drawn = validation.grid(images, ["一只猫"], 1)
    assert drawn.tobytes() != validation.grid(images, ["row 1"], 1).tobytes()
    assert drawn.tobytes() != validation.grid(images, ["一只猫"], 1, font_folders=[]).tobytes()


def test_the_first_font_file_with_the_characters_is_used():
    """The search itself, on a folder known to exist: matplotlib's DejaVu Sans has Cyrillic, Pillow's font has not."""
    import matplotlib

    from kandinsky_finetune import validation

    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    font = validation.caption_font(("кошка", "a cat"), (folder,))
    assert font.getname()[0] == "DejaVu Sans" and validation.has_glyphs(font, "кошка")
    assert validation.caption_font(("a cat",), (folder,)).getname()[0] != "DejaVu Sans"  # the default had them


@pytest.mark.parametrize("size", [8, 64, 512])
def test_the_grid_captions_each_row_with_as_much_of_its_prompt_as_fits(size):
    """Even images too narrow for any caption (8 px: the test pipelines' fakes) make a grid, and quickly."""
    from PIL import Image

    from kandinsky_finetune import validation

    prompts = ["a very long prompt about a red fox sitting in the snow at dusk", "x"]
    picture = validation.grid([Image.new("RGB", (size, size), "gray")] * 4, prompts, 2)
    assert picture.size[0] == 2 * size and picture.size[1] > 2 * size
    fits = lambda t: len(t) <= 10  # noqa: E731
    assert validation.fitted("short", fits) == "short"
    assert validation.fitted("a much longer one", fits) == "a much ..."
    assert validation.fitted("anything", lambda t: False) == ""
