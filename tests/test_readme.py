"""Every command and code block in README.md and docs/*.md (and so in their English twins) runs as written, on the
tiny models.

Each document's blocks run in order in a "user folder" of its own (a separate test, so the test processes share
them), where the hub ids and dataset names the documents use (kandinsky-community/..., lambdalabs/...) are local
folders holding the tiny repos and dataset, so `from_pretrained` and `load_dataset` resolve them without a network.
A document needing an earlier output says how to make it in a block of its own. Five things are adapted, nothing
else: `pip install` steps are left out (.ci/run installs from scratch), and each training command gets
`--max_train_steps=2 --resolution=64 --checkpointing_steps=1` appended (argparse keeps the last value), and one
with --enable_bucket `--min_bucket_reso=64` too (the default, 256, leaves no bucket of at most 64 x 64 px), and the
demo (`python -m kandinsky_finetune.demo`) gets `--steps 2` (its 30 default steps train the same code for longer),
and a python block's combined pipeline samples 64 x 64 px in 2 prior and 2 decoder steps unless the block says
otherwise (FAST_SAMPLING, run before the block: the defaults, 512 px in 25 + 100 steps, run the same code for longer).
A block right after `<!-- test: skip: reason -->` is not run; the reason says why.
"""
import glob
import os
import re
import shutil
import sys

import pytest

from conftest import FORKED_RUNS, ROOT, run

OVERRIDES = " --max_train_steps=2 --resolution=64 --checkpointing_steps=1"
DEMO_OVERRIDES = " --steps 2"
BUCKET_OVERRIDES = " --min_bucket_reso=64"
# the adaptation of python blocks: other defaults for what the block does not pass itself
FAST_SAMPLING = """\
import ppdiffusers as _ppdiffusers


def _sample_fast(call):
    def fast(self, *args, **kwargs):
        for name, value in dict(height=64, width=64, prior_num_inference_steps=2, num_inference_steps=2).items():
            kwargs.setdefault(name, value)
        return call(self, *args, **kwargs)
    return fast


_ppdiffusers.KandinskyV22CombinedPipeline.__call__ = _sample_fast(_ppdiffusers.KandinskyV22CombinedPipeline.__call__)
"""
SKIP = re.compile(r"<!--\s*test:\s*skip:\s*(.+?)\s*-->")
README_LIMIT = 25_000  # bytes: the README keeps the references' shape, the details live in docs/
ZH_DOCS = sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in glob.glob(str(ROOT / "docs" / "*.md"))
                 if not p.endswith("_EN.md"))
DOCUMENTS = ["README.md"] + ZH_DOCS  # Chinese; each has an English twin with the same blocks


def english(document):
    return document[:-len(".md")] + "_EN.md"


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
            command += OVERRIDES + (BUCKET_OVERRIDES if "--enable_bucket" in command else "")
        elif re.search(r"-m kandinsky_finetune\.demo\b", command):
            command += DEMO_OVERRIDES
        out.append(command)
    return "\n".join(out) + "\n"


@pytest.fixture
def user_folder(tiny, tmp_path):
    """A fresh folder per document, as a user who starts reading there has."""
    folder = tmp_path / "user"
    folder.mkdir()
    for name in os.listdir(ROOT):
        if name.startswith("train_") and name.endswith(".py") or name == "kandinsky_finetune":
            os.symlink(ROOT / name, folder / name)
    shutil.copytree(tiny.prior, folder / "kandinsky-community" / "kandinsky-2-2-prior")
    shutil.copytree(tiny.decoder, folder / "kandinsky-community" / "kandinsky-2-2-decoder")
    shutil.copytree(tiny.data, folder / "lambdalabs" / "naruto-blip-captions")
    shutil.copytree(tiny.data, folder / "path_to_your_dataset")
    return folder


def run_block(folder, language, code, name):
    # `python` in a block is this interpreter, its `python file.py` runs forked from one that imported paddle already
    env_path = os.pathsep.join([FORKED_RUNS.python_dir, os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    if language == "bash":
        script = folder / f"{name}.sh"
        script.write_text("set -e\n" + adapt_shell(code))
        cmd = ["bash", str(script)]
    else:
        script = folder / f"{name}.py"
        script.write_text((FAST_SAMPLING + "\n" if "KandinskyV22CombinedPipeline" in code else "") + code)
        cmd = [sys.executable, str(script)]
    run(cmd, cwd=folder, env={"PATH": env_path})


def check_readme_part_1(folder):
    assert os.path.isfile(folder / "robot-naruto-base.png")


def check_readme_part_2(folder):
    assert os.path.isfile(folder / "demo_output" / "demo.png")
    assert os.path.isfile(folder / "robot-naruto-both.png")
    # the multi-process command keeps the launcher's logs under its output folder, not in ./log
    assert os.path.isfile(folder / "kandi2-prior-2proc" / "logs" / "launcher" / "workerlog.1")
    assert not os.path.exists(folder / "log")


def check_sharding(folder):
    # the sharded launch and its resumed single-process run both finished into the one output folder
    assert os.path.isfile(folder / "kandi2-prior-sharded" / "logs" / "launcher" / "workerlog.1")
    assert os.path.isfile(folder / "kandi2-prior-sharded" / "model_index.json")
    assert not os.path.exists(folder / "log")


def check_hub(folder):
    assert os.path.isfile(folder / "kandi22-decoder-naruto-lora" / "README.md")


def section_of(document, line):
    """The number of the `## N` section of `document` that holds `line` (0 before the first)."""
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()[:line]
    numbers = [int(m.group(1)) for m in (re.match(r"## (\d+) ", text) for text in lines) if m]
    return numbers[-1] if numbers else 0


# (document, its sections a test runs, check, the sections whose first block it runs first because it uses their
# output). README is the longest document: it runs as two tests, so the two test processes share it; the second
# uses (6.1) and resumes (9) the decoder run of section 5, so it runs that command first, as a user would. The demo
# (section 2) stands alone and goes to the second, which balances them (each inference block samples for a while).
ALL = range(100)
README_PARTS = ((0, 1, 3, 4, 5), (2, 6, 7, 8, 9, 10, 11, 12, 13))
PARTS = [("README.md", README_PARTS[0], check_readme_part_1, ()),
         ("README.md", README_PARTS[1], check_readme_part_2, (5,))]
PARTS += [(d, ALL, {"docs/sharding.md": check_sharding, "docs/hub.md": check_hub}.get(d), ()) for d in ZH_DOCS
          if any(reason is None for _, _, reason, _ in code_blocks(d))]
RUNNABLE = sorted({part[0] for part in PARTS})
IDS = ["README.md:1,3-5", "README.md:2,6-13"] + [part[0] for part in PARTS[2:]]


@pytest.mark.parametrize("document, sections, check, needs", PARTS, ids=IDS)
def test_blocks_run_as_written(document, sections, check, needs, user_folder):
    """A document's blocks (of these sections), in order, in a folder of their own; its English twin has the same ones
    (test_english_twins_have_the_same_blocks)."""
    blocks = [(k, b) for k, b in enumerate(code_blocks(document)) if b[2] is None]
    assert blocks, f"{document} has no block to run"
    todo = [next((k, b) for k, b in blocks if section_of(document, b[3]) == n) for n in needs]
    todo += [(k, b) for k, b in blocks if section_of(document, b[3]) in sections]
    for k, (language, code, _, line) in todo:
        run_block(user_folder, language, code, f"block{k:02d}_line{line}")
    if check:
        check(user_folder)


def test_every_document_with_blocks_is_run():
    """Every README block runs in one of its two parts; every document with a block to run is run."""
    blocks = [b for b in code_blocks("README.md") if b[2] is None]
    assert len(blocks) >= 10
    parts = [[b for b in blocks if section_of("README.md", b[3]) in part] for part in README_PARTS]
    assert sorted(parts[0] + parts[1], key=lambda b: b[3]) == blocks  # every README block in one part
    assert "README.md" in RUNNABLE and "docs/sharding.md" in RUNNABLE and len(RUNNABLE) >= 5


def test_readme_commands_use_a_dataset_that_exists():
    """lambdalabs/pokemon-blip-captions, the references' dataset, was taken down: no block may use it."""
    for document in DOCUMENTS + [english(d) for d in DOCUMENTS]:
        used = [line for _, code, _, line in code_blocks(document) if "pokemon-blip-captions" in code]
        assert not used, f"{document}: blocks at lines {used} use the removed dataset"


def test_ci_runs_the_readme_test_command():
    """.ci/run must run the README's test command, word for word."""
    commands = [code for lang, code, reason, _ in code_blocks("README.md") if "pytest" in code]
    assert len(commands) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[0].strip() in ci


@pytest.mark.parametrize("document", DOCUMENTS)
def test_english_twins_have_the_same_blocks(document):
    """README_EN.md says the same as README.md, docs/x_EN.md as docs/x.md: the same commands and code, in the same
    order."""
    def code_only(readme):
        return [(lang, re.sub(r"#.*", "", code).split()) for lang, code, _, _ in code_blocks(readme)]

    assert code_only(document) == code_only(english(document))


def test_every_doc_has_its_english_twin():
    english_docs = {os.path.basename(p) for p in glob.glob(str(ROOT / "docs" / "*_EN.md"))}
    assert english_docs == {os.path.basename(english(d)) for d in ZH_DOCS}
    assert len(ZH_DOCS) >= 6


@pytest.mark.parametrize("readme", ["README.md", "README_EN.md"])
def test_readme_stays_short(readme):
    """The README users know from the references is about 10 KB; the details go to docs/."""
    size = os.path.getsize(ROOT / readme)
    assert size <= README_LIMIT, f"{readme} is {size} bytes, over {README_LIMIT}: move details to docs/"


def test_links_resolve():
    """Every relative link in the READMEs and docs/ names a file that exists (anchors are not checked); every doc
    starts with a link back to its README, and its README links to it."""
    for document in DOCUMENTS + [english(d) for d in DOCUMENTS]:
        text = (ROOT / document).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            assert (ROOT / os.path.dirname(document) / path).exists(), f"{document}: broken link {target}"
        if document.startswith("docs/"):
            readme = "README_EN.md" if document.endswith("_EN.md") else "README.md"
            assert text.startswith(f"[← README](../{readme})"), document
            assert f"]({document})" in (ROOT / readme).read_text(encoding="utf-8"), f"{readme} does not link {document}"
