"""The tests' forked runs (forked_runs.py) behave as `python -u file.py ...` in a new interpreter would, and only runs
whose environment cannot matter at import are forked."""
import os
import subprocess
import sys
import textwrap

from conftest import FORKED_RUNS, GIVEN_ENVIRONMENT, run

SHOW = textwrap.dedent("""\
    import os, sys
    print("paddle imported before the run:", "paddle" in sys.modules)
    print("argv:", sys.argv[1:])
    print("cwd:", os.getcwd())
    print("TRAIN_DIR:", os.environ.get("TRAIN_DIR"))
    print("to stderr", file=sys.stderr)
    if "--fail" in sys.argv:
        raise ValueError("the run's own error")
    sys.exit(int(sys.argv[1]))
""")


def write_show(folder):
    path = folder / "show.py"
    path.write_text(SHOW)
    return path


def test_a_forked_run_has_its_own_argv_folder_environment_streams_and_exit_code(tmp_path):
    show = write_show(tmp_path)
    proc = run([sys.executable, "-u", show, 3, "two words"], cwd=tmp_path, check=False, env={"TRAIN_DIR": "x"})
    assert proc.returncode == 3
    assert proc.stdout.splitlines() == ["paddle imported before the run: True", "argv: ['3', 'two words']",
                                        f"cwd: {tmp_path}", "TRAIN_DIR: x"]
    assert proc.stderr == "to stderr\n"
    # an exception ends it as it ends an interpreter: the traceback on stderr, exit code 1
    failed = run([sys.executable, show, 0, "--fail"], cwd=tmp_path, check=False)
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("ValueError: the run's own error")


def test_what_could_matter_at_import_gets_a_new_interpreter(tmp_path):
    show = write_show(tmp_path)
    for env, new_interpreter in (({"HF_DATASETS_CACHE": str(tmp_path)}, False), (None, True)):
        proc = run([sys.executable, show, 0], cwd=tmp_path, env=env, new_interpreter=new_interpreter)
        assert proc.stdout.startswith("paddle imported before the run: False"), (env, new_interpreter)
    proc = run([sys.executable, "-c", "import sys; print('paddle' in sys.modules)"], cwd=tmp_path)
    assert proc.stdout == "False\n"


def test_a_shells_python_forks_what_it_can(tmp_path):
    """README blocks run with FORKED_RUNS.python_dir first on PATH: `python file.py` forked, the rest as before."""
    show = write_show(tmp_path)
    script = tmp_path / "block.sh"
    script.write_text(f"export TRAIN_DIR=y\npython -u {show} 0 a\nFROM_HF_HUB=1 python {show} 5 b || echo \"exit $?\"\n"
                      "python -c 'import sys; print(sys.argv)' c\n")
    env = {**GIVEN_ENVIRONMENT, "PATH": FORKED_RUNS.python_dir + os.pathsep + GIVEN_ENVIRONMENT["PATH"]}
    proc = subprocess.run(["bash", "-e", str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == ["paddle imported before the run: True", "argv: ['0', 'a']", f"cwd: {tmp_path}", "TRAIN_DIR: y"]
    assert lines[4] == "paddle imported before the run: False"  # FROM_HF_HUB is read at import: a new interpreter
    assert lines[-2:] == ["exit 5", "['-c', 'c']"]


def test_a_forked_launch_forks_its_workers(tmp_path):
    """`python -m paddle.distributed.launch` is forked, and starts its workers with the server's `python`: each rank
    forked, with the launcher's environment for it; a failing rank fails the launch as it would have."""
    show = write_show(tmp_path)
    proc = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", 2, "--log_dir", tmp_path / "log",
                show, 0], cwd=tmp_path)
    for rank in (0, 1):
        log = (tmp_path / "log" / f"workerlog.{rank}").read_text()
        assert "paddle imported before the run: True" in log and "argv: ['0']" in log, log
    assert "Exit code 0" in proc.stderr
    failed = run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", 2, "--log_dir",
                  tmp_path / "log2", show, 4], cwd=tmp_path, check=False)
    assert failed.returncode != 0


def test_a_run_ends_with_its_client_and_a_signal_death_is_passed_on(tmp_path):
    """A client that goes away (a killed `python`, a launcher's killed worker) takes its forked run with it; a run
    ended by a signal ends the shell's `python` by the same signal, as the launcher expects of a worker."""
    import signal
    import time

    import forked_runs

    sleeper = tmp_path / "sleep.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    FORKED_RUNS.start()
    with open(os.devnull) as null:
        sock, pid = forked_runs.start_run(FORKED_RUNS.socket, [str(sleeper)], tmp_path, GIVEN_ENVIRONMENT,
                                          [null.fileno()] * 3)
    sock.close()
    for _ in range(600):  # (at most a minute; the run would sleep ten)
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")
    killer = tmp_path / "kill_self.py"
    killer.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    python = os.path.join(FORKED_RUNS.python_dir, "python")
    proc = subprocess.run([python, "-u", str(killer)], cwd=tmp_path, env=GIVEN_ENVIRONMENT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
