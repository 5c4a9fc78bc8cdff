"""The warm `fusedit` (tests/warm.py) behaves as the console script where tests rely on it: the same output,
exit status and files, the caller's directory and environment, a signal reaches the command, and a killed
client takes its command with it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import warm

pytestmark = pytest.mark.skipif(not warm.ON, reason="FUSEDIT_TEST_WARM=0 (every command a fresh process)")


def _server_up(timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(warm.DIR / "sock"))
                return
            except OSError:
                time.sleep(0.5)
    pytest.fail(f"the warm server did not listen within {timeout:.0f} s: {(warm.DIR / 'server.log').read_text()}")


def _both(args: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    runs = []
    for exe, where in ((warm.FUSEDIT, cwd / "warm"), (warm.REAL, cwd / "real")):
        where.mkdir()
        runs.append(subprocess.run([exe, *args], cwd=where, env={**os.environ, **env}, capture_output=True,
                                   text=True, timeout=300))
    return runs[0], runs[1]


def test_a_command_gives_the_console_scripts_output_status_and_files(tmp_path):
    _server_up()
    w, r = _both(["data", "synth", "--out", "s", "--samples", "6", "--shard-size", "3"], tmp_path)
    assert (w.returncode, r.returncode) == (0, 0), (w.stderr, r.stderr)
    for name in ("shard-000000.tar", "shard-000001.tar"):  # written in the caller's directory, byte for byte
        assert (tmp_path / "warm" / "s" / name).read_bytes() == (tmp_path / "real" / "s" / name).read_bytes()
    w, r = _both(["model", "summary", "--recipe", "nope"], tmp_path / "warm")
    assert (w.returncode, w.stdout, w.stderr) == (r.returncode, r.stdout, r.stderr) and w.returncode == 2


def test_kfp_tasks_fork_and_other_python_commands_run_the_real_interpreter(tmp_path):
    """The `python` client kfp.local runs its tasks with: `-m kfp.dsl.executor_main` runs in a fork of the
    server (not a child of the caller), exiting as the real interpreter does; anything else is the real one."""
    _server_up()
    code = "import os, sys; print(os.getppid() == int(sys.argv[1]), sys.argv[2:])"
    r = subprocess.run([warm.PYTHON, "-c", code, str(os.getpid()), "a b"], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout) == (0, "True ['a b']\n"), r.stderr  # exec'd: this test is its parent
    (tmp_path / "comp.py").write_text("import os, sys\nprint('parent', os.getppid())\nsys.exit(3)\n")
    task = ["-m", warm.KFP_TASK, "--component_module_path", str(tmp_path / "comp.py"), "--function_to_execute",
            "f", "--executor_input", "{}"]  # loading the component module prints its parent and exits 3
    w, real = (subprocess.run([exe, *task], capture_output=True, text=True, timeout=120)
               for exe in (warm.PYTHON, sys.executable))
    assert w.returncode == real.returncode == 3, (w.stderr, real.stderr)
    assert real.stdout.splitlines()[-1] == f"parent {os.getpid()}"
    assert w.stdout.splitlines()[-1] != f"parent {os.getpid()}", w.stdout  # the server's child


def test_the_command_sees_the_callers_environment(tmp_path):
    """Credentials and the S3 endpoint come from the caller's environment, not the server's."""
    _server_up()
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FUSEDIT_S3"))}
    cmd = [warm.FUSEDIT, "data", "filter", "--input", "s3://b/x/", "--output", "o"]
    r = subprocess.run(cmd, cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no AWS credentials" in r.stderr, r.stderr
    env = {**bare, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "FUSEDIT_S3_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "http://127.0.0.1:9/b?list-type=2" in r.stderr.splitlines()[-1], r.stderr


def test_signals_reach_the_command_and_a_killed_client_takes_it_along(tmp_path):
    """A submit to a KFP endpoint that accepts and never answers hangs mid-request; SIGTERM to the client ends
    the command by SIGTERM, SIGKILL to the client makes the server kill it: either way its connection closes.
    (That SIGTERM is forwarded, not the command killed when the client dies, shows in tests/test_train.py:
    the warm `fusedit train` saves and exits 75.)"""
    _server_up()
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with socket.create_server(("127.0.0.1", 0)) as kfp:
            kfp.settimeout(120)
            proc = subprocess.Popen([warm.FUSEDIT, "pipeline", "submit", "--host",
                                     f"http://127.0.0.1:{kfp.getsockname()[1]}", "--params", str(params)],
                                    cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            conn, _ = kfp.accept()  # the command is waiting for our answer
            with conn:
                proc.send_signal(sig)
                assert proc.wait(timeout=60) == -sig
                conn.settimeout(60)
                while conn.recv(1 << 16):  # the request, then EOF once the command is gone (else: timeout)
                    pass
