"""Each full fine-tuning script trains on the tiny models: the loss falls on an overfit run, checkpoints
rotate, and the saved output is what inference needs."""
import json
import os

import numpy as np
import pytest

from conftest import logged, model_args, run_script, state_dict_of

# one test process for the whole module (-n 2): its tests take their module-scoped run by name
# (request.getfixturevalue), which conftest.py cannot see when it groups the tests sharing one
pytestmark = pytest.mark.xdist_group("test_training")

STEPS = 40  # 8 samples in batches of 4: 2 steps per epoch, 20 epochs
VALIDATION = ["--validation_prompts", "a red picture", "a blue picture", "--validation_epochs", 10]


@pytest.fixture(scope="module")
def prior_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior_run") / "out"
    run_script("train_text_to_image_prior.py", *model_args(
        tiny, out, "--max_train_steps", STEPS, "--train_batch_size", 4, "--learning_rate", 1e-3,
        "--lr_warmup_steps", 0, "--checkpointing_steps", 10, "--checkpoints_total_limit", 2, *VALIDATION))
    return out


@pytest.fixture(scope="module")
def decoder_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder_run") / "out"
    run_script("train_text_to_image_decoder.py", *model_args(
        tiny, out, "--max_train_steps", STEPS, "--train_batch_size", 4, "--learning_rate", 1e-3,
        "--lr_warmup_steps", 0, "--checkpointing_steps", 10, "--checkpoints_total_limit", 2, "--center_crop", *VALIDATION))
    return out


def assert_loss_falls(losses):
    assert len(losses) == STEPS
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.8 * first, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"


def test_prior_loss_falls(prior_run):
    assert_loss_falls(logged(prior_run))


def test_decoder_loss_falls(decoder_run):
    assert_loss_falls(logged(decoder_run))


@pytest.mark.parametrize("run_name,model", [("prior_run", "prior"), ("decoder_run", "unet")])
def test_checkpoints_rotate_and_hold_weights_and_state(run_name, model, request):
    out = request.getfixturevalue(run_name)
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-30", "checkpoint-40"]  # --checkpoints_total_limit 2 of 10, 20, 30, 40
    assert os.path.isfile(out / "checkpoint-40" / "training_state.pdparams")
    final = state_dict_of(out / ("prior" if model == "prior" else "unet"))
    at_40 = state_dict_of(out / "checkpoint-40" / model)
    assert final.keys() == at_40.keys()
    assert all(np.array_equal(final[k], at_40[k]) for k in final)


def test_prior_output_is_a_prior_pipeline_with_unclip_scheduler(prior_run):
    index = json.loads((prior_run / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22PriorPipeline"
    assert index["scheduler"] == ["ppdiffusers", "UnCLIPScheduler"]


def test_prior_keeps_clip_statistics_fixed(prior_run, tiny):
    before = state_dict_of(os.path.join(tiny.prior, "prior"))
    after = state_dict_of(prior_run / "prior")
    for name in ("clip_mean", "clip_std"):
        assert np.array_equal(before[name], after[name])
    assert not np.array_equal(before["proj_in.weight"], after["proj_in.weight"])


@pytest.mark.parametrize("run_name", ["prior_run", "decoder_run"])
def test_validation_images_every_n_epochs_and_at_the_end(run_name, request):
    from visualdl import LogReader
    import glob

    out = request.getfixturevalue(run_name)
    # after epochs 0 and 10 (steps 2 and 22), and at the end (step 40); one image per prompt, and the round's grid
    assert sorted(os.listdir(out / "validation")) == ["step-2", "step-22", "step-40"]
    assert all(sorted(os.listdir(out / "validation" / step)) == ["0.png", "1.png", "grid.png"]
               for step in ("step-2", "step-22", "step-40"))
    reader = LogReader(file_path=glob.glob(str(out / "logs" / "*" / "vdlrecords*"))[0])
    assert {"validation/0", "validation/1"} <= set(reader.get_tags()["image"])


@pytest.mark.parametrize("run_name,sources", [
    ("prior_run", {name: ("prior", name) for name in
                   ("image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")}),
    ("decoder_run", {"movq": ("decoder", "movq"), "scheduler": ("decoder", "scheduler"),
                     **{"prior_" + name: ("prior", name) for name in
                        ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")}}),
])
def test_outputs_link_the_frozen_components_to_their_source_files(run_name, sources, request, tiny):
    """Nothing trained is written anew: each file of a frozen component is the source repo's file itself (a hard
    link: the original bytes, no disk), and the folder still loads as its pipeline."""
    from ppdiffusers import DiffusionPipeline

    out = request.getfixturevalue(run_name)
    for name, (repo, subfolder) in sources.items():
        source = os.path.join(tiny.prior if repo == "prior" else tiny.decoder, subfolder)
        files = sorted(os.listdir(source))
        assert sorted(os.listdir(out / name)) == files, name
        assert all(os.path.samefile(out / name / f, os.path.join(source, f)) for f in files), name
    pipe = DiffusionPipeline.from_pretrained(str(out))
    trained = "prior" if run_name == "prior_run" else "unet"
    saved = state_dict_of(out / trained)
    live = getattr(pipe, trained).state_dict()
    assert all(np.array_equal(live[k].numpy(), saved[k]) for k in saved)


def test_steady_speed_counts_training_time_only(monkeypatch):
    """Validation and checkpoints inside the loop stop the step clock: 5 steps of 2 s with a 100 s validation
    and a 50 s checkpoint in between are 0.5 steps/s, and training time is 10 s."""
    from kandinsky_finetune import tracking

    now = [1000.0]
    monkeypatch.setattr(tracking.time, "time", lambda: now[0])
    clock = tracking.Stopwatch()
    clock.start_training()
    for step in range(5):
        now[0] += 2
        clock.step_done()
        if step == 3:  # between the two steps the steady rate is taken from (the first 3 are warm-up)
            with clock.phase("validation"):
                now[0] += 100
        if step == 2:
            with clock.phase("checkpointing"):
                now[0] += 50
    clock.stop_training()
    assert clock.steady_steps_per_second() == pytest.approx(0.5)
    assert clock.seconds["training"] == pytest.approx(10)


def test_every_steps_scalars_reach_the_log_and_a_checkpoint_writes_them_to_disk(tmp_path):
    """The tracker gets the scalars in batches (tracking.Tracker): every step's value still reaches the log, in
    order; flush(to_disk=True), as each checkpoint calls it, puts them on disk while the run goes on."""
    from types import SimpleNamespace

    from kandinsky_finetune import tracking

    args = SimpleNamespace(report_to="visualdl", output_dir=str(tmp_path), logging_dir="logs",
                           tracker_project_name="run")
    tracker = tracking.Tracker(args, True)
    losses = [np.float32(step / 1000) for step in range(1, 251)]
    for step, loss in enumerate(losses, 1):
        tracker.scalars({"train_loss": float(loss), "lr": 1e-4}, step)
    tracker.flush(to_disk=True)
    assert logged(tmp_path) == losses  # (the writer still open)
    tracker.scalars({"train_loss": 0.5, "lr": 1e-4}, 251)
    tracker.close()
    assert logged(tmp_path) == losses + [0.5]


def test_runs_print_no_library_warnings_users_cannot_act_on(tiny, tmp_path):
    """Paddle's ccache notice, setuptools' distutils notice and the combined pipeline's own callback_steps
    deprecation (during validation) stay out of a run's output."""
    proc = run_script("train_text_to_image_prior_lora.py", *model_args(
        tiny, tmp_path / "out", "--max_train_steps", 1, "--validation_prompt", "a red picture",
        "--num_validation_images", 1))
    assert "validation images:" in proc.stderr
    for noise in ("No ccache found", "Setuptools is replacing distutils", "callback_steps"):
        assert noise not in proc.stderr + proc.stdout, noise


def test_a_decoder_output_outlives_its_source_repos(tiny, tmp_path):
    """The frozen components are hard links, not references: with the source repos deleted after training, the
    output still loads as a KandinskyV22CombinedPipeline."""
    import shutil

    from ppdiffusers import KandinskyV22CombinedPipeline

    prior, decoder = tmp_path / "prior", tmp_path / "decoder"
    shutil.copytree(tiny.prior, prior)
    shutil.copytree(tiny.decoder, decoder)
    out = tmp_path / "out"
    run_script("train_text_to_image_decoder.py", *model_args(tiny, out, "--max_train_steps", 1),
               "--pretrained_prior_model_name_or_path", prior, "--pretrained_decoder_model_name_or_path", decoder)
    shutil.rmtree(prior)
    shutil.rmtree(decoder)
    pipe = KandinskyV22CombinedPipeline.from_pretrained(str(out))
    assert pipe.prior_image_encoder is not None and pipe.movq is not None


@pytest.mark.parametrize("allow", [False, True], ids=["default", "allow_tf32"])
def test_allow_tf32_governs_matmuls_only(monkeypatch, allow):
    """As the references' --allow_tf32 (PyTorch's matmul switch): cuBLAS follows the flag, and cuDNN convolutions keep
    Paddle's default, TF32, as PyTorch's do (turned off, fp32 UNet convolutions ran at full fp32 on Ampere and later)."""
    import paddle

    from kandinsky_finetune import precision

    switched = []
    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    for switch in "set_cublas_switch", "set_cudnn_switch":
        monkeypatch.setattr(paddle.base.core, switch, lambda on, switch=switch: switched.append((switch, on)))
    precision.configure_tf32(allow, log=None)
    assert switched == [("set_cublas_switch", allow)]
