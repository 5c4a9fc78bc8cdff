"""The filter step: shards in (local or S3), clean resharded shards + rejects, stats, metrics, report out.

Two passes. (1) In parallel, one input shard per task: stream the tar, judge every sample on its
own, write the passing ones to a per-shard work tar and one stats row per sample (a shard that is
done is skipped on a re-run). (2) In one process: mark duplicates across the whole input in input
order, reshard the survivors, write rejects/stats/metrics and the data-quality report, and publish
(data first, manifest last). Every input sample is either kept or has a reject row.

The manifest (`manifest.json`, written last) holds `fingerprint` (a hash of inputs + config: an
equal one means the output is reused), `inputs`, `files` (every published file, relative to the
output), `counts` (samples per output shard, keyed by the shard's path relative to the output with
`/` separators, e.g. `{"shards/shard-000000.tar": 1000}`; readers use them instead of counting, see
`shared.shards.shard_counts`) and `result` (the FilterResult without its run timings).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from fusedit.components.data.checks import DECODE_REASONS, EMPTY_ROW, REASONS
from fusedit.components.data.dedupe import mark_duplicates
from fusedit.components.data.examples import image_reader, pick_examples
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.shard_pass import is_done, read_lines, run_tasks, write_lines
from fusedit.components.shared import storage
from fusedit.components.shared.shards import MANIFEST
from fusedit.components.shared.tario import TarSink
from fusedit.errors import UserError

log = logging.getLogger(__name__)
# Files of a run that record how it went, not what it decided (timings; Great Expectations' own run
# history, named by run time): left out of the manifest, and out of DVC's hash of the report (.dvcignore)
RUN_RECORDS = ("timing.json", "report/validation.json", "report/gx/")



class FilterResult(BaseModel):
    output: str
    n_in: int
    n_kept: int
    n_rejected: int
    reasons: dict[str, int]
    shards: list[str]
    n_bad_shards: int
    quality_success: bool | None = None
    failed_expectations: list[str] = []
    reused: bool = False  # the published output already matched inputs + config
    metrics: dict[str, Any] = {}  # what was decided: a function of inputs and config (metrics.json)
    run: dict[str, Any] = {}  # how the run went (seconds, images/s, workers): timing.json, never metrics


class QualityGateError(UserError):
    """The data-quality suite failed and `fail_on_quality` is set (outputs are already written)."""


# ------------------------------------------------------------------ pass 2

class _ShardSink:
    """Writes samples into numbered output shards of at most `size` samples (atomic per shard)."""

    def __init__(self, out_dir: str, size: int):
        self.out_dir, self.size = out_dir, size
        self.names: list[str] = []
        self.counts: list[int] = []  # samples written to each shard, aligned with `names`
        self._writer = None
        self._file = None
        self._count = 0

    def write_raw(self, blob: bytes) -> None:
        """Append one whole sample (its tar bytes, as written by TarSink in pass 1)."""
        if self._writer is None:
            name = f"shard-{len(self.names):06d}.tar"
            self.names.append(name)
            self._file = open(os.path.join(self.out_dir, name + ".part"), "wb")
            self._writer = TarSink(self._file)
        self._writer.copy_raw(blob)
        self._count += 1
        if self._count == self.size:
            self._finish()

    def _finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            name = self.names[-1]
            self.counts.append(self._count)
            os.replace(os.path.join(self.out_dir, name + ".part"), os.path.join(self.out_dir, name))
        self._writer, self._file, self._count = None, None, 0

    def close(self) -> list[str]:
        self._finish()
        return self.names


def _metrics(rows: list[dict[str, Any]], bad: list[dict[str, Any]], n_shards_in: int, n_shards_out: int,
             tokenizer: bool) -> dict[str, Any]:
    n_in = len(rows)
    reasons = Counter(r["reason"] for r in rows if r["decision"] == "rejected")
    n_kept = sum(r["decision"] == "kept" for r in rows)
    dup = reasons["exact_duplicate"] + reasons["near_duplicate"]
    dec = sum(reasons[r] for r in DECODE_REASONS)
    converted = Counter(r["mode"] for r in rows if r["converted"] and r["decision"] == "kept")

    def rate(k: int) -> float:
        return round(k / n_in, 6) if n_in else 0.0

    return {
        "n_in": n_in, "n_kept": n_kept, "n_rejected": n_in - n_kept,
        "reject_rate": rate(n_in - n_kept), "duplicate_rate": rate(dup), "decode_failure_rate": rate(dec),
        "reasons": {r: reasons.get(r, 0) for r in REASONS},
        "n_converted": sum(converted.values()), "converted_from": dict(sorted(converted.items())),
        "n_shards_in": n_shards_in, "n_shards_out": n_shards_out,
        "n_bad_shards": len(bad), "bad_shards": bad,
        "tokenizer_checked": tokenizer,
    }


def _stats_frame(rows: list[dict[str, Any]]):
    import pandas as pd

    df = pd.DataFrame(rows, columns=None if rows else list(EMPTY_ROW)).drop(columns=["tar_offset", "tar_length"],
                                                                           errors="ignore")
    for col in ("width", "height", "image_bytes", "caption_chars", "caption_tokens", "index"):
        df[col] = df[col].astype("Int64")
    df["aspect"] = df["aspect"].astype("Float64")
    df["decode_failed"] = df["reason"].isin(DECODE_REASONS)
    df["is_duplicate"] = df["reason"].isin(("exact_duplicate", "near_duplicate"))
    return df


def _default_work_dir(cfg: FilterConfig) -> str:
    if cfg.work_dir:
        return cfg.work_dir
    if storage.is_s3(cfg.output):
        import hashlib

        digest = hashlib.sha256(cfg.output.encode()).hexdigest()[:16]
        return os.path.join(os.path.expanduser("~/.cache/fusedit/filter"), digest)
    return os.path.join(cfg.output, ".work")


def _gate(result: FilterResult, cfg: FilterConfig) -> FilterResult:
    if cfg.fail_on_quality and result.quality_success is False:
        raise QualityGateError("data quality gate failed: " + "; ".join(result.failed_expectations))
    return result


# ------------------------------------------------------------------ pass 2 phases

@dataclass
class _Collected:
    """Pass 1's per-shard results in input order, with duplicates marked across the whole input."""

    rows: list[dict[str, Any]]  # one per input sample (decision, reason, tar_offset/length of a kept one)
    bad: list[dict[str, Any]]  # {"shard", "detail"} of each shard that could not be read to its end
    thumbs: dict[tuple[str, int], str]  # (input shard, sample index) -> thumbnail of a rejected sample
    originals: dict[int, int]  # duplicate row position -> original row position


@dataclass
class _Kept:
    """The resharded survivors: output shard file names and the samples written to each (aligned)."""

    names: list[str]
    counts: list[int]


@dataclass
class _Published:
    """What the manifest records besides the file list: the run's identity, its inputs and its result."""

    run_fp: str
    inputs: list[str]
    old_manifest: dict[str, Any] | None
    kept: _Kept
    result: FilterResult


def _plan_inputs(cfg: FilterConfig) -> tuple[list[str], list[dict[str, Any]], str]:
    """(input shard URIs, their identities, the run fingerprint); a missing input fails here, naming it."""
    import hashlib

    if not cfg.input or not cfg.output:
        raise UserError("filter needs an input pattern and an output directory (--input, --output)")
    storage.configure(**cfg.s3.model_dump())
    inputs = storage.expand(cfg.input)
    if not inputs:
        raise UserError(f"no shards match {cfg.input!r}")
    identities = [storage.stat(u) for u in inputs]
    run_fp = hashlib.sha256(json.dumps([cfg.run_fingerprint(), inputs, identities],
                                       sort_keys=True).encode()).hexdigest()[:16]
    return inputs, identities, run_fp


def _previous_output(cfg: FilterConfig, run_fp: str) -> tuple[FilterResult | None, dict[str, Any] | None]:
    """(the published result when it already matches `run_fp`, else None; the old manifest).

    An old output that does not match loses its manifest here: from then on it no longer looks complete."""
    manifest_uri = storage.join(cfg.output, MANIFEST)
    old_manifest = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
    if old_manifest and old_manifest.get("fingerprint") == run_fp:
        log.info("%s already holds this exact result; nothing to do", cfg.output)
        return FilterResult(**{**old_manifest["result"], "reused": True}), old_manifest
    if old_manifest is not None:
        storage.remove(manifest_uri)
    return None, old_manifest


def _plan_tasks(cfg: FilterConfig, inputs: list[str], identities: list[dict[str, Any]]
                ) -> tuple[str, list[dict[str, Any]]]:
    """(the work directory, one pass-1 task per input shard, in input order)."""
    work = _default_work_dir(cfg)
    os.makedirs(work, exist_ok=True)
    shard_fp = cfg.shard_fingerprint()
    tasks = [{"uri": u, "identity": ident, "fingerprint": shard_fp, "dir": os.path.join(work, f"{i:06d}"),
              "config": cfg.model_dump()} for i, (u, ident) in enumerate(zip(inputs, identities, strict=True))]
    return work, tasks


def _pending(cfg: FilterConfig, tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(the tasks a previous run did not finish, how many workers run them)."""
    todo = [t for t in tasks if not is_done(t["dir"], t)]
    workers = min(cfg.workers or os.cpu_count() or 1, max(1, len(todo)))
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d shards already done", len(tasks) - len(todo), len(tasks))
    return todo, workers


def _collect(cfg: FilterConfig, tasks: list[dict[str, Any]]) -> _Collected:
    """Read back every task's rows, bad-shard record and thumbnails; mark duplicates across all of them."""
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    thumbs: dict[tuple[str, int], str] = {}
    for t in tasks:
        rows += read_lines(os.path.join(t["dir"], "rows.jsonl"))
        with open(os.path.join(t["dir"], "done.json")) as f:
            done = json.load(f)
        if done["bad_shard"]:
            bad.append(done["bad_shard"])
        with open(os.path.join(t["dir"], "thumbs.json")) as f:
            thumbs.update({(t["uri"], int(k)): v for k, v in json.load(f).items()})
    originals = mark_duplicates(rows, cfg.dedupe_exact, cfg.dedupe_near, cfg.near_threshold)
    return _Collected(rows, bad, thumbs, originals)


def _new_stage(work: str) -> str:
    """An empty local staging directory (with its `shards/` folder) that is published as a whole."""
    stage = os.path.join(work, "publish")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(os.path.join(stage, "shards"))
    return stage


def _reshard(tasks: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: str, size: int) -> _Kept:
    """Copy the kept samples' bytes, in input order, into output shards of `size`: no re-parsing, no re-encoding."""
    sink = _ShardSink(out_dir, size)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        if r["decision"] == "kept":
            by_shard.setdefault(r["shard"], []).append((r["tar_offset"], r["tar_length"]))
    for t in tasks:
        ranges = by_shard.get(t["uri"])
        if not ranges:
            continue
        with open(os.path.join(t["dir"], "kept.tar"), "rb") as f:
            for offset, length in ranges:
                f.seek(offset)
                sink.write_raw(f.read(length))
    names = sink.close()
    return _Kept(names, list(sink.counts))


def _write_rejects(path: str, col: _Collected) -> None:
    rejects = [{"key": r["key"], "shard": r["shard"], "index": r["index"], "reason": r["reason"],
                "detail": r["detail"]} for r in col.rows if r["decision"] == "rejected"]
    rejects += [{"key": None, "shard": b["shard"], "index": None, "reason": "bad_shard", "detail": b["detail"]}
                for b in col.bad]
    write_lines(path, rejects)


def _quality(cfg: FilterConfig, tasks: list[dict[str, Any]], col: _Collected, stats, metrics: dict[str, Any],
             report_dir: str) -> tuple[bool | None, list[str]]:
    """Run the data-quality suite and write the report (when `cfg.report`); adds metrics["quality"]."""
    if not cfg.report:
        return None, []
    from fusedit.components.data.quality import run_quality

    read = image_reader({t["uri"]: os.path.join(t["dir"], "kept.tar") for t in tasks}, cfg.max_member_bytes)
    examples = pick_examples(col.rows, col.originals, col.thumbs, cfg, read)
    q = run_quality(stats, metrics, cfg, report_dir, examples)
    metrics["quality"] = {"success": q.success, "failed": q.failed, "evaluated": q.evaluated}
    return q.success, q.failed


def _write_records(cfg: FilterConfig, n_shards_in: int, tasks: list[dict[str, Any]], col: _Collected, kept: _Kept,
                   stage: str, run: dict[str, Any]) -> FilterResult:
    """Write rejects, stats, timing, the quality report and metrics into `stage`; the run's result."""
    _write_rejects(os.path.join(stage, "rejects.jsonl"), col)
    stats = _stats_frame(col.rows)
    stats.to_parquet(os.path.join(stage, "stats.parquet"), index=False)
    metrics = _metrics(col.rows, col.bad, n_shards_in, len(kept.names), cfg.tokenizer is not None)
    storage.write_json(os.path.join(stage, "timing.json"), run)
    quality_success, failed = _quality(cfg, tasks, col, stats, metrics, os.path.join(stage, "report"))
    storage.write_json(os.path.join(stage, "metrics.json"), metrics)
    return FilterResult(output=cfg.output, n_in=metrics["n_in"], n_kept=metrics["n_kept"],
                        n_rejected=metrics["n_rejected"],
                        reasons={k: v for k, v in metrics["reasons"].items() if v},
                        shards=[storage.join(cfg.output, "shards", n) for n in kept.names],
                        n_bad_shards=len(col.bad), quality_success=quality_success,
                        failed_expectations=failed, metrics=metrics, run=run)


def _publish(cfg: FilterConfig, stage: str, pub: _Published) -> None:
    """Replace the output with `stage` (data first, manifest last); drop S3 objects the new output lacks."""
    files = sorted(f for f in (os.path.relpath(p, stage) for p in storage.list_uris(stage))
                   if not f.startswith(RUN_RECORDS))
    if not storage.is_s3(cfg.output):
        for sub in ("shards", "report"):
            shutil.rmtree(os.path.join(cfg.output, sub), ignore_errors=True)
    counts = {f"shards/{n}": c for n, c in zip(pub.kept.names, pub.kept.counts, strict=True)}
    storage.publish(stage, cfg.output, MANIFEST, {"fingerprint": pub.run_fp, "inputs": pub.inputs, "files": files,
                                                   "counts": counts,
                                                   "result": pub.result.model_dump(exclude={"run"})})
    if pub.old_manifest and storage.is_s3(cfg.output):
        for stale in set(pub.old_manifest.get("files", [])) - set(files):
            storage.remove(storage.join(cfg.output, stale))


# ------------------------------------------------------------------ the step

def filter_shards(cfg: FilterConfig) -> FilterResult:
    """Filter, dedupe and reshard `cfg.input` into `cfg.output`; see the module docstring."""
    inputs, identities, run_fp = _plan_inputs(cfg)
    reused, old_manifest = _previous_output(cfg, run_fp)
    if reused is not None:
        return _gate(reused, cfg)
    work, tasks = _plan_tasks(cfg, inputs, identities)
    todo, workers = _pending(cfg, tasks)
    t0 = time.perf_counter()
    run_tasks(todo, workers)
    col = _collect(cfg, tasks)
    stage = _new_stage(work)
    kept = _reshard(tasks, col.rows, os.path.join(stage, "shards"), cfg.samples_per_shard)
    seconds = time.perf_counter() - t0
    run = {"seconds": round(seconds, 3), "images_per_s": round(len(col.rows) / seconds, 1) if seconds > 0 else 0.0,
           "workers": workers}
    result = _write_records(cfg, len(inputs), tasks, col, kept, stage, run)
    _publish(cfg, stage, _Published(run_fp, inputs, old_manifest, kept, result))
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return _gate(result, cfg)
