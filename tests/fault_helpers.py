"""Helpers for the fault tests: run a `fusedit` command in a real child process and SIGKILL it.

Children come from a multiprocessing fork server that imported torch, transformers and the fusedit
steps once, so each killed run starts in milliseconds instead of the ~8 s a cold interpreter needs
here; every child is still a separate OS process running the real CLI entry point (`fusedit.cli.main`).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import psutil

PRELOAD = ["torch", "transformers", "diffusers", "fusedit.cli", "fusedit.components.data.filter",
           "fusedit.components.cache.build", "fusedit.components.train.loop", "fusedit.components.evaluate.run",
           "fusedit.model.pipeline"]
_ctx: mp.context.BaseContext | None = None


def context() -> mp.context.BaseContext:
    """The fork-server context (started on first use, shared by every test in the session)."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
        warm = _ctx.Process(target=os.getpid)  # starts the server now, so no timed run pays for it
        warm.start()
        warm.join()
    return _ctx


def _stop_after_first_call(target: str) -> None:
    """Wrap `module:function` so that this process stops itself (SIGSTOP) as its first call returns: a kill
    point inside a write that takes milliseconds, which a poll-then-kill could miss on a fast machine."""
    module, name = target.split(":")
    owner = import_module(module)
    original = getattr(owner, name)

    def stop_after(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGSTOP)  # the test SIGKILLs the stopped run
        return result

    setattr(owner, name, stop_after)


def _child(argv: list[str], env: dict[str, str], log: str, fsize: int | None = None,
           log_level: int | None = None, stop_after: str | None = None) -> None:
    os.setpgid(0, 0)  # its own process group: a kill takes its pool workers too, as a pod kill would
    if fsize is not None:  # a file-size limit: writes past it fail with EFBIG, as a full disk fails them
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the child
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.update(env)
    if log_level is not None:  # configured first, so a step's own basicConfig (e.g. WARNING) is a no-op
        import logging

        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if stop_after is not None:
        _stop_after_first_call(stop_after)
    from fusedit.cli import main

    try:
        main(argv)
    except SystemExit as e:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class Run:
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    fsize: int | None = None  # RLIMIT_FSIZE for the child, in bytes
    log_level: int | None = None  # root logging level for the child (e.g. INFO to see a step's resume line)
    stop_after: str | None = None  # module:function after whose first call the child stops (to be killed)

    def start(self) -> mp.process.BaseProcess:
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **self.env}
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        proc = context().Process(target=_child, args=(self.argv, env, str(self.log), self.fsize, self.log_level,
                                                                 self.stop_after))
        proc.start()
        return proc

    def finish(self, timeout: float = 300) -> int:
        """Run to the end; the exit code (a hang past `timeout` fails the test)."""
        context()
        proc = self.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise AssertionError(f"{self.argv[:3]} did not finish within {timeout}s:\n{self.tail()}")
        return proc.exitcode

    def complete(self, timeout: float = 300) -> float:
        """Run to the end; returns the seconds it took. Fails the test on a non-zero exit."""
        context()
        t0 = time.perf_counter()
        code = self.finish(timeout)
        assert code == 0, f"{self.argv[:3]} exited {code}:\n{self.tail()}"
        return time.perf_counter() - t0

    def kill_when(self, ready: Callable[[], bool], timeout: float = 300, poll: float = 0.005) -> int:
        """Start, and SIGKILL the run the moment `ready()` turns true (a progress file appeared, a line was
        printed): a kill point that lands at the same place of the work on any machine. Fails the test if the
        run exits (or hangs past `timeout`) before that; returns the killed run's exit code (-SIGKILL)."""
        context()
        proc = self.start()
        t0 = time.perf_counter()
        stopped = (lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED) if self.stop_after else None
        while not (ready() and (stopped is None or stopped())):  # with stop_after: killed where it stopped
            if not proc.is_alive() or time.perf_counter() - t0 > timeout:
                proc.join(0.1)
                if proc.exitcode is None:
                    self._kill(proc)
                raise AssertionError(f"{self.argv[:3]} reached no kill point (exit {proc.exitcode}):\n{self.tail()}")
            time.sleep(poll)
        self._kill(proc, timeout)
        assert proc.exitcode == -signal.SIGKILL, f"{self.argv[:3]} exited {proc.exitcode}:\n{self.tail()}"
        return proc.exitcode

    @staticmethod
    def _kill(proc: mp.process.BaseProcess, timeout: float = 300) -> None:
        """SIGKILL the run's process group (the run and its pool workers, as a pod kill takes them)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet its own group leader
            proc.kill()
        proc.join(timeout)

    def said(self, text: str) -> bool:
        """Whether the current run has printed `text` yet (a phase boundary to kill after)."""
        if not self.log.exists():  # the child has not opened it yet
            return False
        with open(self.log, errors="replace") as f:
            f.seek(self._offset)
            return text in f.read()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""
