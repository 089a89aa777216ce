"""Python runs for the tests, forked from a server that has imported paddle and ppdiffusers already: each run is its
own process with its own argv, environment, folder and standard streams, as `python -u script.py ...` from a shell
gives, without the ~5 s a new interpreter spends importing them (most of a run on the tiny models).

    python tests/forked_runs.py --serve SOCKET     # prints "ready" once the libraries are imported; SOCKET.env
                                                   # holds its environment
    python -S tests/forked_runs.py --python SOCKET [-u] script.py args...   # `python` for a shell (see conftest.py)

A run comes here only when its environment differs from the server's in nothing read at import (SAFE_TO_DIFFER), and
only `python [-u] file.py ...`; anything else runs in a new interpreter. What still differs from a new interpreter:
Paddle's CPU kernels use the one thread the server's paddle import gave them (cpu_threads.py logs "paddle was
imported first"): slower, and sums taken in another order, so weights differ in the last digits (~1e-5 on the tiny
prior) from a new interpreter's. A test comparing weights with a run it starts itself (to kill it) runs its own
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


def forkable(argv, env, server_env, cwd):
    """The script's argv when `python argv...` run in `cwd` can be forked from the server, else None."""
    options = list(argv)
    while options and options[0] == "-u":
        options.pop(0)
    if not options or not options[0].endswith(".py") or not os.path.isfile(os.path.join(cwd, options[0])):
        return None
    differing = {k for k in set(env) | set(server_env) if env.get(k) != server_env.get(k)}
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
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)


def report_exit(pid, conn):
    _, status = os.waitpid(pid, 0)
    try:
        send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
    except OSError:  # the client is gone
        pass
    conn.close()


def serve(socket_path):
    with open(socket_path + ".env", "w") as f:  # as started: importing paddle sets OMP_NUM_THREADS
        json.dump(dict(os.environ), f)
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
            become(request, fds)
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
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        as_python(sys.argv[2], sys.argv[3:])
