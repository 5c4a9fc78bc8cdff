"""A warm `fusedit` for the test suite: one server process imports the CLI's modules once and forks a child
per command, so tests that run `fusedit` by name (DVC stages, `subprocess.run([FUSEDIT, ...])`) do not pay
for importing torch, transformers and diffusers every time (8-11 s per process on 2 cores).

    with warm.running(): ...      (the session fixture in conftest.py) write the clients, start the server
    warm.FUSEDIT, warm.cli_env()  the `fusedit` to run, and an environment with it first on PATH
    warm.PYTHON                   what kfp.local's SubprocessRunner runs each task with (`kfp_tasks_warm`)

The client (`DIR/bin/fusedit`) is a few lines of stdlib Python (started with -S): it connects to SOCKET and passes
its argv, working directory, environment and its own stdin/stdout/stderr file descriptors; the server forks;
the child takes those descriptors, directory and environment and runs `fusedit.cli.main`, exactly what the
console script runs. The client exits with the child's status (re-raising the signal that killed it),
forwards SIGINT/SIGTERM/SIGHUP to it, and if the client itself dies (SIGKILL) the server kills the child.
When the server cannot be reached, the client execs the real console script instead.

The second client (`DIR/kfp/python`) does the same for `python -m kfp.dsl.executor_main ...`, the command
kfp.local runs for each task of a pipeline (the child runs that module as `python -m` would); any other
`python` command execs the real interpreter.

What is not the same as a fresh process: state fixed at import time (the server starts with the test
session's environment) and the parent process. Tests of process behaviour (signals, `python -m fusedit`,
a SIGKILLed torchrun, non-UTF-8 argv) start real processes (`REAL`). torchrun may start the client as its
ranks: each is a fork with torchrun's environment (RANK, WORLD_SIZE, MASTER_PORT, ...).
"""
from __future__ import annotations

import atexit
import json
import os
import pkgutil
import runpy
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path

REAL = str(Path(sys.executable).parent / "fusedit")
HEADER = struct.Struct("!I")
ON = os.environ.get("FUSEDIT_TEST_WARM", "1") != "0"  # FUSEDIT_TEST_WARM=0: every command a fresh process
DIR = Path(tempfile.gettempdir()) / f"fusedit-warm-{os.getpid()}"  # this test process's server and client
FUSEDIT = str(DIR / "bin" / "fusedit") if ON else REAL  # what tests run as `fusedit`
PYTHON = str(DIR / "kfp" / "python") if ON else sys.executable  # kfp.local's tasks' python (not on PATH)
KFP_TASK = "kfp.dsl.executor_main"  # the module kfp.local's SubprocessRunner runs for each task

CLIENT = '''#!{python} -S
import json, os, signal, socket, struct, sys
{guard}try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({sock!r})
except OSError:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
req = json.dumps({{"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), **{extra!r}}}).encode()
try:
    socket.send_fds(s, [struct.pack("!I", len(req)) + req], [0, 1, 2])
    f = s.makefile("rb")
    pid = int(f.readline())
except (OSError, ValueError):  # e.g. a closed stdin, or no server behind the socket: nothing ran yet
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda n, _: os.kill(pid, n))
line = f.readline()
code = int(line) if line.strip() else 1
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


def preload() -> None:
    """Import every module of the project (commands import most of theirs lazily, inside the function)."""
    packages = [import_module(p) for p in ("fusedit", "fusedit.model", "fusedit.components", "fusedit.pipelines",
                                           "fusedit.jobs")]  # an editable install maps each to its own folder
    for info in (i for p in packages for i in pkgutil.walk_packages(p.__path__, f"{p.__name__}.")):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            try:
                import_module(info.name)
            except Exception:  # noqa: BLE001, S112 - an optional dependency the command would miss too
                continue


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 16)
        if not more:
            raise ConnectionError("client closed mid-request")
        data += more
    return json.loads(data[HEADER.size:]), fds


def _child(req: dict, fds: list[int]) -> None:
    """Become the command: the client's descriptors, directory and environment, then the CLI. Never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:  # the OpenMP runtime read the server's environment at load
            import torch

            torch.set_num_threads(int(threads))
        try:
            _run(req)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - as the interpreter would: a traceback and exit 1
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run(req: dict) -> None:
    """What the client's command runs: `fusedit.cli.main`, or a module as `python -m` runs it."""
    if "module" in req:
        sys.argv = [req["argv"][0], *req["argv"][3:]]  # python -m MODULE ARGS...: runpy sets argv[0]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        return
    from fusedit.cli import main

    sys.argv = list(req["argv"])
    main(sys.argv[1:])


def kfp_tasks_warm(client: str) -> Callable[[], None]:
    """Make kfp.local's SubprocessRunner (use_venv=False) start each task with the `python` client (path
    `client`) instead of this interpreter, so the task forks from the warm server; returns what undoes it.
    In the test process and in the server (for commands that run kfp.local: `fusedit pipeline run-local`)."""
    from kfp.local import subprocess_task_handler as handler

    original = handler.replace_python_executable

    def replace(full_command: list[str], new_executable: str) -> list[str]:
        return original(full_command, client if new_executable == sys.executable else new_executable)

    handler.replace_python_executable = replace
    return lambda: setattr(handler, "replace_python_executable", original)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a command that runs `fusedit` by name (a DVC stage): the client first on PATH."""
    path = os.pathsep.join([str(DIR / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "PATH": path, **extra}


@contextmanager
def running():
    """Write the client and start the server in the background. Until the server listens (a moment after it
    starts) the client falls back to the real console script; from then on a command waits for the import."""
    for sub in ("bin", "kfp"):
        (DIR / sub).mkdir(parents=True, exist_ok=True)
    sock = str(DIR / "sock")
    guard = (f"if sys.argv[1:3] != ['-m', {KFP_TASK!r}]:\n"
             f"    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    for path, real, guard_, extra in ((FUSEDIT, REAL, "", {}), (PYTHON, sys.executable, guard, {"module": KFP_TASK})):
        Path(path).write_text(CLIENT.format(python=sys.executable, sock=sock, real=real, guard=guard_, extra=extra))
        Path(path).chmod(0o755)
    restore = kfp_tasks_warm(PYTHON)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "tests.warm", "serve", sock], cwd=root,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(DIR / "server.log", "wb"))  # noqa: SIM115
    try:
        yield
    finally:
        restore()
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(DIR, ignore_errors=True)


def serve(path: str) -> None:
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # clients see the socket only once it listens
    preload()  # a client that connects meanwhile waits in the backlog: cheaper than a second import
    kfp_tasks_warm(str(Path(path).parent / "kfp" / "python"))  # DIR here would name the server's own pid
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    live: dict[int, socket.socket] = {}
    while True:
        for key, _ in sel.select(timeout=0.05):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    req, fds = _receive(conn)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    for other in (listener, conn, *live.values()):
                        other.close()
                    sel.close()
                    _child(req, fds)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                live[pid] = conn
                sel.register(conn, selectors.EVENT_READ, pid)
            elif not key.fileobj.recv(64):  # the client went away (killed): so does its command
                sel.unregister(key.fileobj)
                _kill(key.data)
        _reap(live, sel)
        if os.getppid() != parent:  # the test session ended without stopping us
            for pid in live:
                _kill(pid)
            return


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(live: dict[int, socket.socket], sel: selectors.BaseSelector) -> None:
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = live.pop(pid, None)
        if conn is None:
            continue
        try:
            sel.unregister(conn)
        except KeyError:
            pass
        try:
            conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tests.warm serve SOCKET")
    serve(sys.argv[2])
