"""Shared fixtures: tiny random Kandinsky 2.2 repos and a tiny captioned imagefolder, built once per session,
and a helper that runs the real scripts as a user would, a process per run (`python file.py ...` and
`python -m paddle.distributed.launch ...`, with its workers, forked from a process that has imported paddle already,
see forked_runs.py; anything else in a new interpreter)."""
import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The environment the tests were started with: importing paddle below sets OMP_NUM_THREADS=1 in this process, which
# the scripts would take for the user's choice (cpu_threads.py)
GIVEN_ENVIRONMENT = dict(os.environ)

import forked_runs  # noqa: E402
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


def run(cmd, cwd=ROOT, check=True, timeout=900, env=None, new_interpreter=False):
    """Run `cmd` to its end (its stdout and stderr in the result). `python [-u] file.py ...` and a launch are forked
    from this test process's forked_runs.py server unless `new_interpreter` (or the environment differs in what is
    read at import)."""
    cmd = list(map(str, cmd))
    full_env = {**GIVEN_ENVIRONMENT, **(env or {})}
    argv = None if new_interpreter or cmd[0] != sys.executable else forked_runs.forkable(
        cmd[1:], full_env, GIVEN_ENVIRONMENT, str(cwd))
    if argv is not None:
        proc = FORKED_RUNS.run(argv, cwd, full_env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


class ForkedRuns:
    """This test process's forked_runs.py server, started at its first run: a run costs a fork, not a new interpreter
    importing paddle (~5 s of a ~6 s tiny run); `python_dir` holds a `python` that sends a shell's runs to it."""

    def __init__(self):
        self.folder = self.socket = self.server = None

    def start(self):
        if self.server is not None and self.server.poll() is None:
            return
        self.folder = tempfile.mkdtemp(prefix="forked-runs-")
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)  # (after the kill below: atexit runs LIFO)
        self.socket = os.path.join(self.folder, "socket")
        self.server = subprocess.Popen([sys.executable, forked_runs.__file__, "--serve", self.socket],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                       env=GIVEN_ENVIRONMENT)
        atexit.register(self.server.kill)
        for line in self.server.stdout:  # (anything an import prints comes before)
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("tests/forked_runs.py --serve ended before it was ready")

    @property
    def python_dir(self):
        """A folder whose `python` runs as this interpreter does, forked from the server when it can be."""
        self.start()
        return os.path.dirname(forked_runs.python_path(self.socket))

    def run(self, argv, cwd, env, timeout):
        self.start()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, open(os.devnull) as stdin:
            sock, pid = forked_runs.start_run(self.socket, argv, cwd, env, [stdin.fileno(), out.fileno(),
                                                                              err.fileno()])
            sock.settimeout(timeout)
            try:
                code = forked_runs.returncode(sock)
            except TimeoutError:
                os.kill(pid, 9)
                sock.close()
                raise subprocess.TimeoutExpired(argv, timeout)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(argv, code, out.read().decode(errors="replace"),
                                               err.read().decode(errors="replace"))


FORKED_RUNS = ForkedRuns()


def run_script(script, *args, check=True, cwd=ROOT, env=None, new_interpreter=False):
    return run([sys.executable, "-u", str(ROOT / script), *map(str, args)], cwd=cwd, check=check, env=env,
               new_interpreter=new_interpreter)


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
