"""Helpers for the fault tests: run a `fusedit` command in a real child process and SIGKILL it.

Children come from a multiprocessing fork server that imported torch, transformers and the fusedit
steps once, so each killed run starts in milliseconds instead of the ~8 s a cold interpreter needs
here; every child is still a separate OS process running the real CLI entry point (`fusedit.cli.main`).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def _child(argv: list[str], env: dict[str, str], log: str, fsize: int | None = None) -> None:
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

    def start(self) -> mp.process.BaseProcess:
        env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **self.env}
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        proc = context().Process(target=_child, args=(self.argv, env, str(self.log), self.fsize))
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

    def kill_after(self, delay: float, after: Callable[[], bool] | None = None, timeout: float = 300) -> bool:
        """Start, SIGKILL `delay` seconds after the start (or after `after()` turns true); True if the
        kill landed (False: the run finished first)."""
        context()
        proc = self.start()
        if after is not None:
            while not after() and proc.is_alive():
                time.sleep(0.01)
        proc.join(delay)
        if proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join(timeout)
            if proc.exitcode == 0:  # it exited in the instant between the check and the kill
                return False
            assert proc.exitcode == -signal.SIGKILL, f"{self.argv[:3]} exited {proc.exitcode}:\n{self.tail()}"
            return True
        assert proc.exitcode == 0, f"{self.argv[:3]} exited {proc.exitcode}:\n{self.tail()}"
        return False

    def seconds_after(self, event: Callable[[], bool], timeout: float = 300) -> float:
        """Run to the end; the seconds between `event()` turning true and the exit (a phase's length)."""
        context()
        proc = self.start()
        while not event() and proc.is_alive():
            time.sleep(0.01)
        t0 = time.perf_counter()
        proc.join(timeout)
        assert proc.exitcode == 0, f"{self.argv[:3]} exited {proc.exitcode}:\n{self.tail()}"
        return time.perf_counter() - t0

    def said(self, text: str) -> bool:
        """Whether the current run has printed `text` yet (a phase boundary to kill after)."""
        with open(self.log, errors="replace") as f:
            f.seek(self._offset)
            return text in f.read()

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class KillReport:
    step: str
    delays: list[float] = field(default_factory=list)
    landed: int = 0


def kill_and_resume(run: Run, duration: float, seeds: list[int], check: Callable[[], None],
                    step: str, lo: float = 0.05, hi: float = 0.85, after: Callable[[], bool] | None = None,
                    reset: Callable[[], None] | None = None) -> KillReport:
    """Kill the same output at one seeded random point per seed (each kill resumes the last one's
    work), check nothing half-written looks complete after each, then run it to the end.

    A run that finishes before its kill (a faster machine than the timed one) is `reset` (its output
    removed), so the next seed again has a whole run to land in."""
    report = KillReport(step)
    for seed in seeds:
        delay = random.Random(seed).uniform(lo * duration, hi * duration)
        report.delays.append(round(delay, 3))
        landed = run.kill_after(delay, after)
        report.landed += landed
        check()
        if not landed and reset is not None:
            reset()
    run.complete()
    print(f"kill points {step}: {report.landed} of {len(seeds)} landed mid-run at {report.delays} s")
    return report
