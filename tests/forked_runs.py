"""Python runs for the tests, forked from a server that has imported paddle and ppdiffusers already: each run is its
own process with its own argv, environment, folder and standard streams, as `python -u script.py ...` from a shell
gives, without the ~5 s a new interpreter spends importing them (most of a run on the tiny models).

    python tests/forked_runs.py --serve SOCKET     # prints "ready" once the libraries are imported; SOCKET.env
                                                   # holds its environment
    python -S tests/forked_runs.py --python SOCKET [-u] script.py args...   # `python` for a shell (see conftest.py)

A run comes here only when its environment differs from the server's in nothing read at import (SAFE_TO_DIFFER), and
only `python [-u] file.py ...` or `python -m paddle.distributed.launch ...`; anything else runs in a new interpreter.
A forked launcher starts its workers with the server's `python` for a shell (python_path), so they are forked too: a
worker's environment differs from the launcher's only in what the launcher sets for it (LAUNCHER_SETS).
What still differs from a new interpreter: Paddle's CPU kernels use the one thread the server's paddle import gave
them (cpu_threads.py logs "paddle was imported first"): slower, and sums taken in another order, so weights differ in
the last digits (~1e-5 on the tiny prior) from a new interpreter's (launched workers have one thread each anyway). A test comparing weights with a run it starts itself (to kill it) runs its own
in new interpreters too (conftest.run's `new_interpreter`).
"""
import json
import os
import socket
import struct
import sys
import threading

# variables nothing reads while paddle, ppdiffusers, paddlenlp and datasets are imported (their caches, flags and
# thread counts are read then): a shell's own, the tests' PATH, and the shell variables the READMEs export
SAFE_TO_DIFFER = {"PATH", "PWD", "OLDPWD", "SHLVL", "_", "DATASET_NAME", "TRAIN_DIR"}
# what paddle.distributed.launch adds to a worker's environment: the PADDLE_* rendezvous variables (read when the
# worker joins the group, not at import), and what importing paddle and cv2 set in the launcher (OMP_NUM_THREADS=1,
# the one thread the server's kernels have; cv2's library and Qt paths, read by nothing once loaded)
LAUNCHER_SETS = {"POD_NAME", "CUSTOM_DEVICE_ROOT", "LD_LIBRARY_PATH", "QT_QPA_FONTDIR", "QT_QPA_PLATFORM_PLUGIN_PATH"}
LAUNCHER = ["-m", "paddle.distributed.launch"]


def forkable(argv, env, server_env, cwd):
    """The run's argv (without -u) when `python argv...` run in `cwd` can be forked from the server, else None."""
    options = list(argv)
    while options and options[0] == "-u":
        options.pop(0)
    launch = options[:2] == LAUNCHER
    if not launch and (not options or not options[0].endswith(".py")
                       or not os.path.isfile(os.path.join(cwd, options[0]))):
        return None
    differing = {k for k in set(env) | set(server_env) if env.get(k) != server_env.get(k)}
    if "PADDLE_TRAINER_ID" in env and not launch:  # a launched worker
        differing = {k for k in differing if not k.startswith("PADDLE_") and k not in LAUNCHER_SETS
                     and not (k == "OMP_NUM_THREADS" and env[k] == "1" and k not in server_env)}
    return options if differing <= SAFE_TO_DIFFER else None


def send(sock, message, fds=()):
    data = json.dumps(message).encode()
    socket.send_fds(sock, [struct.pack("!Q", len(data))], list(fds))
    sock.sendall(data)


def receive(sock, max_fds=0):
    """(message, fds), or (None, []) when the other side closed."""
    header, fds, _, _ = socket.recv_fds(sock, 8, max_fds)
    while header and len(header) < 8:
        header += sock.recv(8 - len(header))
    if not header:
        return None, fds
    (size,) = struct.unpack("!Q", header)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


def start_run(socket_path, argv, cwd, env, fds):
    """Ask the server to run `python argv...` with `fds` as its stdin, stdout and stderr: (connection, pid); the
    connection then brings {"returncode": code} (negative: ended by that signal)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    send(sock, {"argv": argv, "cwd": str(cwd), "env": env}, fds)
    return sock, receive(sock)[0]["pid"]


def returncode(sock):
    message, _ = receive(sock)
    sock.close()
    if message is None:
        raise RuntimeError("the forked-runs server ended during a run")
    return message["returncode"]


# ---- the server

def preload():
    import paddle  # noqa: F401
    import ppdiffusers  # noqa: F401  (imports paddlenlp and datasets)


def become(request, fds):
    """In the forked child: become `python -u argv...`; the run's exit, or its exception, ends this process as it ends
    an interpreter (atexit handlers, threads joined, streams flushed)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout.reconfigure(write_through=True)  # -u: each write reaches the file or pipe at once
    sys.stderr.reconfigure(write_through=True)
    import runpy

    if request["argv"][:2] == LAUNCHER:  # its workers start as `sys.executable -u script ...`: forked too
        sys.executable = request["python"]  # (the server's own `python`, see serve)
        sys.argv = [LAUNCHER[1], *request["argv"][2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(LAUNCHER[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)


def report_exit(pid, conn):
    """Send the run's exit code to its client; a client that goes away first (killed, timed out) takes the run with
    it, as a killed launcher's worker or a killed `python` would not leave a run behind."""
    ended = threading.Lock()

    def end_with_client():
        try:
            conn.recv(1)  # the client sends nothing more: this returns when it closes
        except OSError:
            pass
        if ended.acquire(blocking=False):
            os.kill(pid, 9)

    threading.Thread(target=end_with_client, daemon=True).start()
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped: its pid cannot be another's yet
    ended.acquire(blocking=False)
    _, status = os.waitpid(pid, 0)
    try:
        send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
    except OSError:  # the client is gone
        pass
    conn.close()


def python_path(socket_path):
    """The server's `python` for a shell (and for the workers of a launcher it forks)."""
    return os.path.join(os.path.dirname(socket_path), "bin", "python")


def serve(socket_path):
    with open(socket_path + ".env", "w") as f:  # as started: importing paddle sets OMP_NUM_THREADS
        json.dump(dict(os.environ), f)
    python = python_path(socket_path)
    os.makedirs(os.path.dirname(python), exist_ok=True)
    with open(python, "w") as f:
        f.write(f"#!/bin/sh\nexec '{sys.executable}' -S '{os.path.abspath(__file__)}' --python '{socket_path}' "
                '"$@"\n')
    os.chmod(python, 0o755)
    preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        request, fds = receive(conn, max_fds=3)
        if request is None:
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            become({**request, "python": python}, fds)
        for fd in fds:
            os.close(fd)
        send(conn, {"pid": pid})
        threading.Thread(target=report_exit, args=(pid, conn), daemon=True).start()


# ---- `python` for a shell

def as_python(socket_path, args):
    """Run `python args...` forked from the server when it can be, else exec this interpreter; exit as the run did."""
    import signal

    with open(socket_path + ".env") as f:
        argv = forkable(args, dict(os.environ), json.load(f), os.getcwd())
    if argv is None:
        os.execv(sys.executable, [sys.executable, *args])
    sock, pid = start_run(socket_path, argv, os.getcwd(), dict(os.environ), [0, 1, 2])
    for signum in (signal.SIGINT, signal.SIGTERM):  # a signal to this process reaches the run
        signal.signal(signum, lambda s, _: os.kill(pid, s))
    code = returncode(sock)
    if code < 0:  # ended by a signal: so does this process, for whoever waits for it (a launcher)
        if -code in (signal.SIGINT, signal.SIGTERM):  # (the others are uncaught here or cannot be)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        as_python(sys.argv[2], sys.argv[3:])
