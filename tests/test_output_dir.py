"""Nothing of an earlier run is lost by accident: running again into an output_dir that holds its checkpoints or model
stops with one line (continue with --resume_from_checkpoint, or start over with --overwrite_output_dir, which deletes
them only once the new run's input is checked, so `latest` never finds an old run's checkpoint); an output_dir in a
model folder the script reads, and a checkpoint of another script, are one line before anything loads."""
import os
import shutil

import pytest

import train_text_to_image_decoder
import train_text_to_image_decoder_lora
import train_text_to_image_prior
import train_text_to_image_prior_lora
from conftest import model_args, run_script, state_dict_of
from kandinsky_finetune.params import UsageError

LORA = "train_text_to_image_prior_lora.py"


@pytest.fixture(scope="module")
def earlier(tiny, tmp_path_factory):
    """A finished prior LoRA run (checkpoint-1, checkpoint-2 and the saved model), started into a folder that held
    only the launcher's logs (which is no earlier run)."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    (out / "logs" / "launcher").mkdir(parents=True)
    (out / "logs" / "launcher" / "workerlog.0").write_text("the launcher's log\n")
    run_script(LORA, *model_args(tiny, out, "--max_train_steps", 2, "--checkpointing_steps", 1))
    return out


def listing(folder):
    return sorted((os.path.relpath(os.path.join(root, f), folder), os.path.getmtime(os.path.join(root, f)))
                  for root, _, files in os.walk(folder) for f in files)


def test_running_again_into_an_earlier_run_stops_with_one_line(tiny, earlier):
    before = listing(earlier)
    proc = run_script(LORA, *model_args(tiny, earlier, "--max_train_steps", 2), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --output_dir {earlier} already holds 2 checkpoints (checkpoint-1 to checkpoint-2) and a saved model of "
        "an earlier run: continue it with --resume_from_checkpoint latest, or start over with --overwrite_output_dir "
        "(which deletes them)")
    assert "Traceback" not in proc.stderr and "memory plan" not in proc.stderr
    assert listing(earlier) == before  # nothing touched


def test_a_saved_model_alone_counts_too(tiny, earlier, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.link(earlier / "paddle_lora_weights.safetensors", out / "paddle_lora_weights.safetensors")
    with pytest.raises(UsageError, match=r"holds a saved model of an earlier run: start over with "
                                         r"--overwrite_output_dir \(which deletes it\), or choose another --output_dir$"):
        train_text_to_image_prior_lora.main(model_args(tiny, out, "--max_train_steps", 1))


def test_overwrite_output_dir_starts_over_once_the_input_is_checked(tiny, earlier, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    old_model = state_dict_of(out)
    # a run that fails on its input (after the output_dir checks, while loading the data) deletes nothing
    proc = run_script(LORA, *model_args(tiny, out, "--max_train_steps", 1, "--overwrite_output_dir",
                                        "--caption_column", "no_such_column"), check=False)
    assert proc.returncode == 2 and "no_such_column" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    proc = run_script(LORA, *model_args(tiny, out, "--max_train_steps", 1, "--checkpointing_steps", 1,
                                        "--overwrite_output_dir", "--learning_rate", 1e-2))
    assert (f"--overwrite_output_dir: deleted the earlier run's checkpoint-1, checkpoint-2, "
            f"paddle_lora_weights.safetensors, README.md from {out}") in proc.stderr
    # the new run's checkpoint only: `latest` cannot pick the old run's checkpoint-2
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    new_model = state_dict_of(out)
    assert any((new_model[k] != old_model[k]).any() for k in new_model)
    assert (out / "logs" / "launcher" / "workerlog.0").read_text() == "the launcher's log\n"  # logs are kept


def test_overwrite_and_resume_together_are_a_usage_error(tiny, tmp_path):
    with pytest.raises(UsageError, match="--resume_from_checkpoint latest continues a run, --overwrite_output_dir "
                                         "starts over: give one of them"):
        train_text_to_image_prior_lora.main(model_args(tiny, tmp_path / "out", "--overwrite_output_dir",
                                                       "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize("main,repo,inside,flag", [
    (train_text_to_image_prior.main, "prior", "", "--pretrained_prior_model_name_or_path"),
    (train_text_to_image_decoder.main, "decoder", "trained", "--pretrained_decoder_model_name_or_path"),
    (train_text_to_image_decoder_lora.main, "prior", "unet", "--pretrained_prior_model_name_or_path"),
])
def test_an_output_dir_in_a_model_folder_the_script_reads_is_one_line(tiny, main, repo, inside, flag):
    source = getattr(tiny, repo)
    out = os.path.join(source, inside) if inside else source
    before = listing(source)
    where = "is inside" if inside else "is"
    with pytest.raises(UsageError, match=f"^--output_dir {out} {where} {flag} {source}: the run would write over the "
                                         "model it reads; choose another --output_dir$"):
        main(model_args(tiny, out, "--max_train_steps", 1))
    assert listing(source) == before


def test_a_prior_run_may_write_into_a_decoder_folder_it_does_not_read(tiny, tmp_path):
    """(the decoder only serves validation in the prior scripts): no error from the output_dir check."""
    from kandinsky_finetune import output_dir, params

    parser = params.build_parser("test")
    params.add_prior_args(parser)
    args = params.parse(parser, model_args(tiny, os.path.join(tiny.decoder, "x")))
    output_dir.check_not_a_source(args, "prior")
    args.validation_prompts = ["a cat"]
    with pytest.raises(UsageError, match="is inside --pretrained_decoder_model_name_or_path"):
        output_dir.check_not_a_source(args, "prior")


@pytest.mark.parametrize("script,written", [
    ("train_text_to_image_prior.py", "train_text_to_image_prior_lora.py (prior, LoRA)"),
    ("train_text_to_image_decoder_lora.py", "train_text_to_image_prior_lora.py (prior, LoRA)"),
])
def test_resuming_a_checkpoint_of_another_script_is_one_line(tiny, earlier, tmp_path, script, written):
    proc = run_script(script, *model_args(tiny, tmp_path / "out", "--max_train_steps", 3,
                                          "--resume_from_checkpoint", earlier / "checkpoint-2"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint: {earlier / 'checkpoint-2'} was written by {written}, not {script}: resume it "
        "with that script")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_the_kind_of_a_checkpoint_is_read_from_its_files(tiny, earlier, tmp_path):
    """Checkpoints of every version: a full run's model folder, or a LoRA file's layer names."""
    from kandinsky_finetune.checkpoint import written_by

    assert written_by(str(earlier / "checkpoint-1")) == ("prior", True)
    decoder_lora = tmp_path / "decoder_lora"
    train_text_to_image_decoder_lora.main(model_args(tiny, decoder_lora, "--max_train_steps", 1,
                                                     "--checkpointing_steps", 1))
    assert written_by(str(decoder_lora / "checkpoint-1")) == ("decoder", True)
    for model, folder in (("prior", "prior"), ("decoder", "unet")):
        (tmp_path / folder / folder).mkdir(parents=True)
        assert written_by(str(tmp_path / folder)) == (model, False)
    with pytest.raises(UsageError, match=r"was written by train_text_to_image_decoder_lora.py \(decoder, LoRA\), not "
                                         r"train_text_to_image_decoder.py"):
        train_text_to_image_decoder.main(model_args(tiny, tmp_path / "out", "--resume_from_checkpoint",
                                                    decoder_lora / "checkpoint-1"))


def test_every_process_of_a_launch_stops_on_rank_0s_earlier_run(tiny, earlier, tmp_path):
    """Only rank 0 writes output_dir, so its file system decides (on other machines output_dir may not even exist):
    every rank stops with rank 0's line, none waits for it at a collective."""
    import sys

    from conftest import ROOT, run

    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(tmp_path / "log"), str(ROOT / LORA), *model_args(tiny, earlier, "--max_train_steps", 2)],
               cwd=tmp_path, check=False, timeout=300)
    logs = [(tmp_path / "log" / f"workerlog.{rank}").read_text() for rank in (0, 1)]
    assert proc.returncode != 0
    for log in logs:
        assert f"error: --output_dir {earlier} already holds 2 checkpoints" in log and "Traceback" not in log, log[-2000:]
