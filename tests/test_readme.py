"""Every command and code block in README.md (and so README_EN.md) runs as written, on the tiny models.

The blocks run in order in one "user folder" where the hub ids and dataset names the README uses
(kandinsky-community/..., lambdalabs/...) are local folders holding the tiny repos and dataset, so
`from_pretrained` and `load_dataset` resolve them without a network. Two things are adapted, nothing else:
`pip install` steps are left out (.ci/run installs from scratch), and each training command gets
`--max_train_steps=2 --resolution=64 --checkpointing_steps=1` appended (argparse keeps the last value).
A block right after `<!-- test: skip: reason -->` is not run; the reason says why.
"""
import os
import re
import shutil
import sys

import pytest

from conftest import ROOT, run

OVERRIDES = " --max_train_steps=2 --resolution=64 --checkpointing_steps=1"
SKIP = re.compile(r"<!--\s*test:\s*skip:\s*(.+?)\s*-->")


def code_blocks(readme):
    """(language, code, skip reason or None, line number) for each fenced bash/python block."""
    lines = (ROOT / readme).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"```(bash|python)\s*$", lines[i])
        if m:
            start, reason = i, None
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            if j >= 0 and SKIP.search(lines[j]):
                reason = SKIP.search(lines[j]).group(1)
            i += 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((m.group(1), "\n".join(body) + "\n", reason, start + 1))
        i += 1
    return blocks


def adapt_shell(code):
    commands, current = [], ""
    for line in code.splitlines():
        current += line
        if line.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(current)
        current = ""
    out = []
    for command in commands:
        command = re.sub(r"^\s*pip install [^&]*(&&\s*|$)", "", command)
        if re.search(r"train_text_to_image_\w+\.py", command):
            command += OVERRIDES
        out.append(command)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def user_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    for name in os.listdir(ROOT):
        if name.startswith("train_") and name.endswith(".py") or name == "kandinsky_finetune":
            os.symlink(ROOT / name, folder / name)
    shutil.copytree(tiny.prior, folder / "kandinsky-community" / "kandinsky-2-2-prior")
    shutil.copytree(tiny.decoder, folder / "kandinsky-community" / "kandinsky-2-2-decoder")
    shutil.copytree(tiny.data, folder / "lambdalabs" / "naruto-blip-captions")
    shutil.copytree(tiny.data, folder / "path_to_your_dataset")
    return folder


def run_block(folder, language, code, name):
    env_path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if language == "bash":
        script = folder / f"{name}.sh"
        script.write_text("set -e\n" + adapt_shell(code))
        cmd = ["bash", str(script)]
    else:
        script = folder / f"{name}.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    run(cmd, cwd=folder, env={"PATH": env_path})  # `python` in a block is this interpreter


def test_readme_blocks_run_as_written(user_folder):
    """README.md's blocks; README_EN.md has the same ones (test_readmes_have_the_same_blocks)."""
    blocks = code_blocks("README.md")
    assert len([b for b in blocks if b[2] is None]) >= 10
    for k, (language, code, reason, line) in enumerate(blocks):
        if reason is None:
            run_block(user_folder, language, code, f"block{k:02d}_line{line}")
    assert os.path.isfile(user_folder / "demo_output" / "demo.png")
    # the multi-process command keeps the launcher's logs under its output folder, not in ./log
    assert os.path.isfile(user_folder / "kandi2-prior-2proc" / "logs" / "launcher" / "workerlog.1")
    assert not os.path.exists(user_folder / "log")
    assert os.path.isfile(user_folder / "robot-naruto-both.png")


def test_readme_commands_use_a_dataset_that_exists():
    """lambdalabs/pokemon-blip-captions, the references' dataset, was taken down: no block may use it."""
    for readme in "README.md", "README_EN.md":
        used = [line for _, code, _, line in code_blocks(readme) if "pokemon-blip-captions" in code]
        assert not used, f"{readme}: blocks at lines {used} use the removed dataset"


def test_ci_runs_the_readme_test_command():
    """.ci/run must run the README's test command, word for word."""
    commands = [code for lang, code, reason, _ in code_blocks("README.md") if "pytest" in code]
    assert len(commands) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0].strip() in ci


def test_readmes_have_the_same_blocks():
    """README_EN.md says the same as README.md: the same commands and code, in the same order."""
    def code_only(readme):
        return [(lang, re.sub(r"#.*", "", code).split()) for lang, code, _, _ in code_blocks(readme)]

    assert code_only("README.md") == code_only("README_EN.md")
