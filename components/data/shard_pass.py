"""Pass 1 of the filter step: one input shard per task, judged sample by sample, in worker processes.

Each task streams its shard, judges every sample on its own (`checks.judge`), writes the passing samples to a
per-shard work tar (`kept.tar`, with each sample's byte range in its row), one stats row per sample
(`rows.jsonl`), reject thumbnails (`thumbs.json`) and, last, `done.json`: a task whose `done.json` matches its
input identity and config fingerprint is skipped on a rerun. Pass 2 (`filter.py`) reads these back.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fusedit.components.data.checks import judge
from fusedit.components.data.examples import ShardPicker
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.shared import storage
from fusedit.components.shared.tario import Sample, ShardError, TarSink, iter_samples
from fusedit.errors import UserError

log = logging.getLogger("fusedit.components.data.filter")  # one logger for the whole step
_tokenizers: dict[str, Any] = {}


class WorkerDied(UserError):
    """A pass-1 worker process died (killed, out of memory); finished shards are kept for a rerun."""


# ------------------------------------------------------------------ pass 1: one shard

def _tokenizer(path: str | None):
    if path is None:
        return None
    if path not in _tokenizers:
        from transformers import AutoTokenizer

        try:
            _tokenizers[path] = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a bad --tokenizer
            raise UserError(f"cannot load tokenizer from {path!r}: {type(exc).__name__}: {exc}") from None
    return _tokenizers[path]


def process_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Judge every sample of one input shard; write kept.tar, rows.jsonl, thumbs.json, done.json."""
    cfg = FilterConfig.model_validate(task["config"])
    storage.configure(**cfg.s3.model_dump())
    tok = _tokenizer(cfg.tokenizer)
    uri, sdir = task["uri"], task["dir"]
    shutil.rmtree(sdir, ignore_errors=True)
    os.makedirs(sdir)
    rows: list[dict[str, Any]] = []
    picker = ShardPicker(cfg.example_seed, cfg.examples_per_reason)
    bad: dict[str, Any] | None = None
    t0 = time.perf_counter()
    with open(os.path.join(sdir, "kept.tar.part"), "wb") as fout:
        writer = TarSink(fout)
        try:
            with storage.open_read(uri) as stream:
                for sample in iter_samples(stream, cfg.max_member_bytes):
                    j = judge(sample, uri, cfg, tok)
                    if j.members is not None:
                        j.row["tar_offset"], j.row["tar_length"] = writer.write(sample.key, j.members)
                    if j.image is not None and j.row["reason"] is not None:  # kept ones: in pass 2
                        picker.offer(j.row["reason"], j.row["key"], sample.index, j.rgb)
                    rows.append(j.row)
        except ShardError as exc:
            n_read = exc.samples_read  # type: ignore[attr-defined]
            detail = f"shard {exc} after {n_read} complete sample(s)"
            if cfg.on_bad_shard == "error":
                raise UserError(f"{uri}: {detail}") from None
            partial: Sample | None = exc.partial  # type: ignore[attr-defined]
            if partial is not None:
                row = judge(Sample(key=partial.key, index=partial.index), uri, cfg).row
                row.update(reason="truncated_shard", detail=f"sample cut off: shard {exc}")
                rows.append(row)
            bad = {"shard": uri, "detail": detail}
            log.warning("%s: %s", uri, detail)
        writer.close()
    os.replace(os.path.join(sdir, "kept.tar.part"), os.path.join(sdir, "kept.tar"))
    write_lines(os.path.join(sdir, "rows.jsonl"), rows)
    storage.write_json(os.path.join(sdir, "thumbs.json"), {str(k): v for k, v in picker.thumbs.items()})
    done = {"uri": uri, "identity": task["identity"], "fingerprint": task["fingerprint"],
            "n": len(rows), "bad_shard": bad, "seconds": time.perf_counter() - t0}
    storage.write_json(os.path.join(sdir, "done.json"), done)
    return done


def write_lines(path: str, rows: list[dict[str, Any]]) -> None:
    with storage.atomic_write(path) as f:
        for r in rows:
            f.write((json.dumps(r, default=str) + "\n").encode())


def read_lines(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ pass 1 driver

def is_done(sdir: str, task: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(sdir, "done.json")) as f:
            done = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all(done.get(k) == task[k] for k in ("uri", "identity", "fingerprint"))


def run_tasks(tasks: list[dict[str, Any]], workers: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="shard", desc="filter", disable=None)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                process_shard(t)
                bar.update()
            return
        # fork: the parent is light (no torch), children need no re-import and no importable __main__
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        # a worker that dies breaks the whole pool (BrokenProcessPool, never a hang): report it once
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            pending = {pool.submit(process_shard, t) for t in tasks}
            n_done = 0
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()  # re-raises a worker's error (e.g. a missing S3 object)
                        n_done += 1
                        bar.update()
            except BrokenProcessPool:
                raise WorkerDied(f"a filter worker process died (killed, or out of memory?) with "
                                 f"{len(tasks) - n_done} shard(s) unfinished; the {n_done} finished are kept: "
                                 f"rerun to resume (with fewer --workers if memory is short)") from None
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        bar.close()
