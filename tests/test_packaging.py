"""A new user's first minutes: the package installs (so `python -m kandinsky_finetune.tiny_models` works outside the
clone) and the offline demo prints commands a user can paste and says its picture is noise."""
import os
import shlex
import sys

from conftest import GIVEN_ENVIRONMENT, ROOT, run


def test_the_package_installs_and_runs_from_any_folder(tmp_path):
    import shutil

    # built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "kandinsky_finetune", source / "kandinsky_finetune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)])
    proc = run([sys.executable, "-m", "kandinsky_finetune.tiny_models", "repos"], cwd=elsewhere,
               env={"PYTHONPATH": str(target)})
    assert "tiny prior repo: repos/prior" in proc.stdout
    assert os.path.isfile(elsewhere / "repos" / "decoder" / "model_index.json")


def test_demo_prints_commands_a_user_can_paste_and_says_the_picture_is_noise(tmp_path):
    # the folder as an earlier demo left it (so one run checks what running it again does): its tiny repos and
    # dataset, and outputs with a checkpoint this run does not make
    from kandinsky_finetune.tiny_models import build_tiny_kandinsky, write_tiny_dataset

    build_tiny_kandinsky(str(tmp_path / "tiny-kandinsky"))
    write_tiny_dataset(str(tmp_path / "tiny-dataset"))
    for name in "prior-finetuned", "decoder-finetuned":
        (tmp_path / name / "checkpoint-1").mkdir(parents=True)
    proc = run([sys.executable, "-m", "kandinsky_finetune.demo", "--workdir", str(tmp_path), "--steps", "2"])
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["python", "-u"] and os.path.isfile(words[2]), command
    assert "the picture is noise" in proc.stdout.strip().splitlines()[-1]
    # each script shared the cores itself, as when pasted: not the OMP_NUM_THREADS=1 the demo's paddle import set
    threads = [line for line in proc.stderr.splitlines() if "thread(s) per process for Paddle's kernels" in line]
    assert len(threads) == 2 and all(line.endswith("(OMP_NUM_THREADS)") == ("OMP_NUM_THREADS" in GIVEN_ENVIRONMENT)
                                     for line in threads), threads
    # pasted as it is, a command would replace the demo's run: one line says how to go on instead
    pasted = run(shlex.split(commands[0].replace("python", sys.executable, 1)), cwd=tmp_path, check=False)
    assert pasted.returncode == 2 and pasted.stderr.strip().splitlines()[-1].startswith(
        "error: --output_dir ") and "--resume_from_checkpoint latest, or start over with --overwrite_output_dir" \
        in pasted.stderr, pasted.stderr[-2000:]
    # the demo itself starts over when run again
    for name in "prior-finetuned", "decoder-finetuned":
        assert f"removing the previous demo's {tmp_path / name}" in proc.stdout
        assert not (tmp_path / name / "checkpoint-1").exists() and (tmp_path / name / "checkpoint-2").is_dir()
