"""--push_to_hub (Hugging Face) and --save_to_aistudio (AI Studio): a repo that cannot be created or reached is one
error line before anything is trained or written; after training each hub gets exactly the model, its card and the
grid. The hubs' calls are replaced where they leave this process (no network here)."""
import os
import re
from types import SimpleNamespace

import pytest

import train_text_to_image_prior_lora
from conftest import model_args
from kandinsky_finetune import hub
from kandinsky_finetune.faults import RunError
from kandinsky_finetune.params import UsageError

AISTUDIO = ["--save_to_aistudio", "--aistudio_repo_id", "someone/kandi-lora"]


def fails_before_training(tiny, tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=match):
        train_text_to_image_prior_lora.main(model_args(tiny, out, "--max_train_steps", 1, *flags))
    assert not out.exists()


def test_aistudio_without_a_network_fails_before_training(tiny, tmp_path):
    fails_before_training(tiny, tmp_path, [*AISTUDIO, "--aistudio_token", "a-token"],
                          r"^--save_to_aistudio: cannot create or reach the AI Studio repo: ConnectionError")


def test_aistudio_without_a_token_fails_before_training(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("AISTUDIO_ACCESS_TOKEN", raising=False)
    monkeypatch.setenv("AISTUDIO_CACHE_HOME", str(tmp_path))  # no token saved by `aistudio config` there
    fails_before_training(tiny, tmp_path, AISTUDIO, r"^--save_to_aistudio: no AI Studio token: pass --aistudio_token")


def test_aistudio_rejecting_the_name_fails_before_training(tiny, tmp_path, monkeypatch):
    """aistudio-sdk returns its errors instead of raising them."""
    from aistudio_sdk import hub as aistudio_hub

    monkeypatch.setattr(aistudio_hub, "create_repo", lambda **kw: {"error_code": 11001, "error_msg": "invalid name"})
    fails_before_training(tiny, tmp_path, [*AISTUDIO, "--aistudio_token", "a-token"],
                          "cannot create or reach the AI Studio repo: RuntimeError: AI Studio error 11001: invalid name")


def test_an_aistudio_repo_that_exists_is_used(monkeypatch):
    from aistudio_sdk import hub as aistudio_hub

    monkeypatch.setattr(aistudio_hub, "create_repo", lambda **kw: {"error_code": 10003, "error_msg": "exists"})
    hub.check_access(SimpleNamespace(push_to_hub=False, save_to_aistudio=True, aistudio_repo_id="someone/x",
                                     aistudio_token="t"))


def test_hugging_face_without_a_token_fails_before_training(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # nothing saved by `huggingface-cli login`
    fails_before_training(tiny, tmp_path, ["--push_to_hub"], r"^--push_to_hub: no Hugging Face token")


def test_hugging_face_rejecting_the_name_fails_before_training(tiny, tmp_path):
    fails_before_training(tiny, tmp_path, ["--push_to_hub", "--hub_token", "hf_x", "--hub_model_id", "no spaces!"],
                          "--push_to_hub: cannot create or reach the Hugging Face repo: HFValidationError")


@pytest.mark.parametrize("flags,match", [
    (["--save_to_aistudio"], "--save_to_aistudio needs --aistudio_repo_id <user name>/<repo name>"),
    (["--save_to_aistudio", "--aistudio_repo_id", "kandi-lora"], "needs --aistudio_repo_id <user name>/<repo name>"),
    (["--aistudio_repo_id", "someone/kandi-lora"], "are for --save_to_aistudio"),
    (["--aistudio_token", "a-token"], "are for --save_to_aistudio"),
    (["--hub_model_id", "someone/kandi-lora"], "--hub_model_id and --hub_token are for --push_to_hub"),
    (["--hub_token", "hf_x"], "--hub_model_id and --hub_token are for --push_to_hub"),
])
def test_upload_flags_that_cannot_work_are_usage_errors(tiny, tmp_path, flags, match):
    fails_before_training(tiny, tmp_path, flags, match)


@pytest.fixture
def fake_hubs(monkeypatch):
    """Both hubs' repo and upload calls replaced: {hub: [paths in the repo, in upload order]}."""
    import huggingface_hub
    from aistudio_sdk import hub as aistudio_hub

    uploaded = {"hf": [], "aistudio": []}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: SimpleNamespace(repo_id=f"someone/{repo_id.split('/')[-1]}"))

    def create_commit(self, repo_id, operations, **kw):
        assert all(os.path.isfile(op.path_or_fileobj) for op in operations)
        uploaded["hf"].extend(op.path_in_repo for op in operations)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(aistudio_hub, "create_repo", lambda **kw: {"repo_id": kw["repo_id"].split("/")[1]})

    def upload(path_or_fileobj, path_in_repo, **kw):
        assert os.path.isfile(path_or_fileobj)
        uploaded["aistudio"].append(path_in_repo)
        return {"message": "Upload Done."}

    monkeypatch.setattr(aistudio_hub, "upload", upload)
    return uploaded


def test_both_hubs_get_the_model_card_and_grid_only(tiny, tmp_path, fake_hubs):
    out = tmp_path / "out"
    train_text_to_image_prior_lora.main(model_args(
        tiny, out, "--max_train_steps", 2, "--checkpointing_steps", 1, "--validation_prompt", "a red picture",
        "--num_validation_images", 1, "--num_inference_steps", 2, "--push_to_hub", "--hub_token", "hf_x", *AISTUDIO,
        "--aistudio_token", "a-token"))
    assert {"checkpoint-1", "checkpoint-2", "logs", "validation"} <= set(os.listdir(out))  # there, not uploaded
    wanted = ["README.md", "paddle_lora_weights.safetensors", "validation_grid.png"]
    assert fake_hubs == {"hf": wanted, "aistudio": wanted}


def test_what_a_pipeline_output_uploads(tmp_path):
    """A full fine-tuning output: the pipeline's folders and files, the card and the grid; not checkpoints, unfinished
    work, the logs (also under another --logging_dir) or the validation rounds."""
    for path in ["model_index.json", "README.md", "validation_grid.png", "unet/config.json",
                 "unet/model.safetensors", "prior_tokenizer/vocab.json", "checkpoint-5/unet/model.safetensors",
                 "checkpoint-5/training_state.pdparams", ".tmp-output/unet/model.safetensors",
                 "runs/tb/events.out", "logs/launcher/workerlog.0", "validation/step-5/grid.png", "checkpoints.txt"]:
        os.makedirs(os.path.dirname(tmp_path / path), exist_ok=True)
        (tmp_path / path).write_text("x")
    assert hub.files_to_upload(str(tmp_path), "runs") == [
        "README.md", "checkpoints.txt", "model_index.json", "prior_tokenizer/vocab.json", "unet/config.json",
        "unet/model.safetensors", "validation_grid.png"]


def test_a_failed_upload_is_one_line_and_keeps_the_output(tmp_path, monkeypatch):
    from aistudio_sdk import hub as aistudio_hub

    (tmp_path / "README.md").write_text("card")
    monkeypatch.setattr(aistudio_hub, "create_repo", lambda **kw: {"repo_id": "x"})
    monkeypatch.setattr(aistudio_hub, "upload", lambda **kw: {"error_code": 12003, "error_msg": "upload failed"})
    args = SimpleNamespace(push_to_hub=False, save_to_aistudio=True, aistudio_repo_id="someone/x", aistudio_token="t",
                           output_dir=str(tmp_path), logging_dir="logs")
    with pytest.raises(RunError, match=r"--save_to_aistudio: the upload failed \(RuntimeError: README.md: AI Studio "
                                       r"error 12003: upload failed\); .* is saved and complete"):
        hub.upload(args, print)
    assert os.path.isfile(tmp_path / "README.md")


def test_a_two_process_launch_whose_hub_check_fails_ends_on_every_rank(tiny, tmp_path):
    """Rank 0 asks the hub; the other rank must not wait for it at the next collective until gloo gives up."""
    import sys

    from conftest import ROOT, run

    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                str(tmp_path / "log"), str(ROOT / "train_text_to_image_prior_lora.py"),
                *model_args(tiny, out, "--max_train_steps", 1, *AISTUDIO, "--aistudio_token", "a-token")],
               cwd=tmp_path, check=False, timeout=120)
    logs = [(tmp_path / "log" / f"workerlog.{rank}").read_text() for rank in (0, 1)]
    assert proc.returncode != 0
    assert "error: --save_to_aistudio: cannot create or reach the AI Studio repo" in logs[0]
    assert "error: rank 1: rank 0 failed while checking the hub repo" in logs[1], logs[1][-2000:]
    assert not out.exists()


def test_wandb_is_not_given_the_hub_tokens(tmp_path, monkeypatch):
    import sys

    from kandinsky_finetune import tracking

    given = {}
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=lambda **kw: given.update(kw)))
    args = SimpleNamespace(report_to="wandb", output_dir=str(tmp_path), logging_dir="logs", tracker_project_name="p",
                           hub_token="hf-secret", aistudio_token="as-secret", learning_rate=1e-4,
                           command_line=["--hub_token", "hf-secret"])
    tracking.Tracker(args, True)
    assert given["config"]["learning_rate"] == 1e-4
    assert "secret" not in repr(given["config"])


def aistudio_args(*flags):
    return train_text_to_image_prior_lora.parse_args(["--train_data_dir", ".", *AISTUDIO, "--aistudio_token", "t",
                                                     *flags])


@pytest.mark.parametrize("flags,private", [([], True), (["--aistudio_repo_private", "false"], False),
                                           (["--aistudio_repo_private"], True)])
def test_a_new_aistudio_repo_is_private_unless_asked(monkeypatch, flags, private):
    """PaddleNLP's --aistudio_repo_private, default true (aistudio-sdk's own create_repo default is public)."""
    from aistudio_sdk import hub as aistudio_hub

    created = []
    monkeypatch.setattr(aistudio_hub, "create_repo", lambda **kw: created.append(kw) or {"repo_id": "kandi-lora"})
    hub.check_access(aistudio_args(*flags))
    assert created[0]["private"] is private and created[0]["repo_id"] == "someone/kandi-lora"


def test_an_aistudio_token_of_another_user_fails_before_training(monkeypatch):
    """AI Studio makes the repo under the token's user, whatever user the id names: the upload would go elsewhere."""
    from aistudio_sdk import hub as aistudio_hub

    monkeypatch.setattr(aistudio_hub, "create_repo", lambda **kw: {"repo_id": "other/kandi-lora"})
    with pytest.raises(UsageError, match=r"^--aistudio_repo_id someone/kandi-lora: the token is other's, and AI Studio "
                                         r"creates repos under the token's user \(it made other/kandi-lora\): pass "
                                         r"someone's token, or --aistudio_repo_id other/kandi-lora$"):
        hub.check_access(aistudio_args())


@pytest.mark.parametrize("flags,safe", [
    (["--push_to_hub", "--hub_token", "hf_x"], "drop --hub_token and run `huggingface-cli login` or set HF_TOKEN"),
    ([*AISTUDIO, "--aistudio_token", "t"], "drop --aistudio_token and set AISTUDIO_ACCESS_TOKEN or run `aistudio "
                                           "config -t <token>`"),
])
def test_wandb_with_a_token_on_the_command_line_is_refused(tiny, tmp_path, flags, safe):
    """wandb records the command line (as diffusers' scripts refuse it, for the same reason)."""
    fails_before_training(tiny, tmp_path, ["--report_to", "wandb", *flags],
                          rf"^--report_to wandb records the command line, --\w+ included, where everyone who sees the "
                          rf"run can read it: {re.escape(safe)} instead$")


def test_aistudio_repo_private_without_save_to_aistudio_is_a_usage_error(tiny, tmp_path):
    fails_before_training(tiny, tmp_path, ["--aistudio_repo_private", "false"], "are for --save_to_aistudio")
