"""Shared fixtures: tiny random Kandinsky 2.2 repos and a tiny captioned imagefolder, built once per session,
and a helper that runs the real scripts as a user would (a subprocess per run)."""
import glob
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The environment the tests were started with: importing paddle below sets OMP_NUM_THREADS=1 in this process, which
# the scripts would take for the user's choice (cpu_threads.py)
GIVEN_ENVIRONMENT = dict(os.environ)

from kandinsky_finetune.tiny_models import build_tiny_kandinsky, write_tiny_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    prior, decoder = build_tiny_kandinsky(str(root / "repos"))
    return SimpleNamespace(prior=prior, decoder=decoder, data=write_tiny_dataset(str(root / "data"), num_images=8),
                           root=root)


def model_args(tiny, output_dir, *extra):
    return ["--pretrained_prior_model_name_or_path", tiny.prior, "--pretrained_decoder_model_name_or_path",
            tiny.decoder, "--train_data_dir", tiny.data, "--resolution", "64", "--seed", "0",
            "--output_dir", str(output_dir), *map(str, extra)]


def run(cmd, cwd=ROOT, check=True, timeout=900, env=None):
    proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          env={**GIVEN_ENVIRONMENT, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_script(script, *args, check=True, cwd=ROOT, env=None):
    return run([sys.executable, "-u", str(ROOT / script), *map(str, args)], cwd=cwd, check=check, env=env)


def logged(output_dir, tag="train_loss"):
    """The values a run logged to VisualDL under `tag`, in step order."""
    from visualdl import LogReader

    files = glob.glob(os.path.join(str(output_dir), "logs", "*", "vdlrecords*"))
    assert files, f"no VisualDL log in {output_dir}"
    records = LogReader(file_path=files[0]).get_data("scalar", tag)
    return [r.value for r in sorted(records, key=lambda r: r.id)]


def state_dict_of(folder):
    """Weights saved by save_pretrained in `folder` (safetensors), as numpy arrays."""
    from safetensors.numpy import load_file

    files = [f for f in glob.glob(os.path.join(str(folder), "*.safetensors"))
             if os.path.basename(f) != "training_state.safetensors"]  # (a LoRA checkpoint's state sits beside it)
    assert len(files) == 1, files
    return load_file(files[0])


# The longest work first (minutes each, measured with --durations): with two test processes (-n 2) one of them
# running last would leave the other idle to the end. An entry ending in ".py::" is a module's group (below).
LONGEST_FIRST = ("test_readme.py::test_blocks_run_as_written[README.md:2,6-13]",
                 "test_distributed.py::",
                 "test_sharding.py::",
                 "test_sharding_stage3.py::",
                 "test_fault_runs.py::",
                 "test_training.py::",
                 "test_readme.py::test_blocks_run_as_written[README.md:1,3-5]",
                 "test_readme.py::test_blocks_run_as_written[docs/sharding.md]")


def module_fixtures(item):
    """The module-scoped fixtures of the test's own module that the test uses."""
    return [name for name, defs in item._fixtureinfo.name2fixturedefs.items()
            if defs[-1].scope == "module" and item.nodeid.startswith(defs[-1].baseid + "::")]


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups in each test process
def pytest_collection_modifyitems(items):
    # The tests sharing a module-scoped fixture run in one test process (pyproject.toml: --dist loadgroup), so the
    # fixture's runs happen once, not once in each process
    for item in items:
        if hasattr(item, "_fixtureinfo") and module_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    def rank(item):
        group = item.get_closest_marker("xdist_group")
        names = [i for i, name in enumerate(LONGEST_FIRST)
                 if item.nodeid.endswith(name) or group and name == f"{group.args[0]}.py::"]
        return names[0] if names else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
