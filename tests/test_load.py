"""Load: the filter under all cores gives the same output as one worker, and a worker that dies is
reported as one clear error, never a hang; the rerun resumes. (Throughput and memory: bench/load.py.)"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.synth import synth
from tests.cache_helpers import tree
from tests.fault_helpers import Run


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """Many small shards (24 of 6 samples, a few broken ones)."""
    root = tmp_path_factory.mktemp("many")
    synth(str(root), samples=144, seed=8, shard_size=6, bad_fraction=0.1, short_side=(64, 96))
    return root


def _cfg(src: Path, out: Path, workers: int) -> FilterConfig:
    return FilterConfig(input=str(src), output=str(out), min_side=16, report=False, workers=workers,
                        samples_per_shard=20)


def test_all_cores_and_one_worker_write_the_same_shards(tmp_path, many):
    one = filter_shards(_cfg(many, tmp_path / "one", workers=1))
    every = filter_shards(_cfg(many, tmp_path / "all", workers=0))
    assert every.run["workers"] == psutil.cpu_count() or every.run["workers"] == 24
    assert (one.n_in, one.n_kept, one.reasons) == (every.n_in, every.n_kept, every.reasons) and one.n_in == 144
    assert tree(tmp_path / "one" / "shards") == tree(tmp_path / "all" / "shards")
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "all" / "rejects.jsonl").read_bytes()


def test_a_killed_worker_is_reported_not_a_hang_and_the_rerun_resumes(tmp_path, many):
    out = tmp_path / "out"
    run = Run(["data", "filter", "--input", str(many), "--output", str(out), "--workers", "2", "--config",
               str(_yaml(tmp_path))], tmp_path / "filter.log")
    proc = run.start()
    workers: list[psutil.Process] = []
    deadline = time.time() + 120
    while proc.is_alive() and time.time() < deadline:  # mid-run: the pool is up and some shards are done
        workers = psutil.Process(proc.pid).children()
        if workers and len(list(out.glob(".work/*/done.json"))) >= 2:
            break
        time.sleep(0.005)
    assert workers, "the filter never started its worker pool"
    workers[0].send_signal(signal.SIGKILL)
    proc.join(120)  # a hang fails here instead of blocking the suite
    assert proc.exitcode == 2, run.tail()
    last = run.tail().strip().splitlines()[-1]
    assert last.startswith("error: a filter worker process died (killed, or out of memory?) with ")
    assert "Traceback" not in run.tail(100_000) and not (out / "manifest.json").exists()

    done_before = len(list(out.glob(".work/*/done.json")))
    assert 2 <= done_before < 24
    run.complete(timeout=120)
    assert (out / "manifest.json").exists()
    filter_shards(_cfg(many, tmp_path / "ref", workers=1))
    assert tree(out / "shards") == tree(tmp_path / "ref" / "shards")  # nothing lost, nothing twice


def _yaml(tmp: Path) -> Path:
    p = tmp / "filter.yaml"
    p.write_text("min_side: 16\nreport: false\nsamples_per_shard: 20\n")
    return p
