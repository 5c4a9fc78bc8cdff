"""What the images under samples/ were drawn with, so a rerun keeps exactly the images that are still right.

Two records, both written atomically by rank 0 before anything is sampled:

- `samples/settings.json`: what every image depends on (sampler steps and guidance, output size, dtype,
  the pipeline's weights by content hash). A difference refuses with one line naming the fields, or, with
  `overwrite`, discards every sample.
- `samples/jobs.json`: per job (keyed by its first output file) the hash of what its images depend on
  besides those settings (prompt text, seed, image count) and the files it writes. A job whose hash
  changed (a reordered or edited prompt file, another seed or image count) has its old files deleted
  before sampling, so it is drawn again; the images of prompts a suite no longer has (a shorter file,
  --limit) are deleted too; every other finished job is kept. Images never outlive the prompt they were
  drawn for, whatever scorer reads the folder afterwards (GenEval's and DPG-Bench's read whole folders).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fusedit.components.evaluate.evals.sampling import Job
from fusedit.components.shared import storage
from fusedit.errors import UserError

JOBS_FILE = "jobs.json"


def content_hash(root: Path) -> str:
    """sha256 over (relative name, bytes) of every file under root: the same weights copied elsewhere match."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f"{f.relative_to(root).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()[:32]


def check_settings(samples: Path, settings: dict[str, Any], overwrite: bool, main: bool) -> None:
    """Refuse (or with overwrite, clear) samples drawn with other global settings; record the current ones."""
    f = samples / "settings.json"
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except json.JSONDecodeError:
            old = {}
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if not overwrite:
                raise UserError(f"{samples}: images were drawn with other settings ({', '.join(diff)} differ); "
                                "use another --output or pass --overwrite to discard them")
            if main:
                shutil.rmtree(samples)
    if main:
        samples.mkdir(parents=True, exist_ok=True)
        storage.write_json(str(f), settings)  # atomic: a killed run never leaves half a settings file


def job_key(job: Job) -> str:
    """What a job's images depend on besides the global settings."""
    return hashlib.sha256(json.dumps([job.prompt, job.seed, job.n]).encode()).hexdigest()[:24]


def _load(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; delete it and the samples next to it, or pass --overwrite") \
            from None
    return data if isinstance(data, dict) else {}


def _drop(samples: Path, rels: set[str]) -> int:
    gone = 0
    for rel in rels:
        p = samples / rel
        if p.is_file():
            p.unlink()
            gone += 1
    return gone


def _claim(samples: Path, records: dict[str, dict[str, Any]], owner: dict[str, str], job: Job) -> bool:
    """Record `job`; delete whatever its record or its files held before if drawn for something else."""
    outs = [p.relative_to(samples).as_posix() for p in job.outputs]
    slot, key = outs[0], job_key(job)
    rec = records.get(slot)
    if rec is not None and rec.get("key") == key and rec.get("outputs") == outs:
        return False
    doomed = set(outs) | set(rec.get("outputs", []) if rec else [])
    for other in {owner[o] for o in outs if o in owner} - {slot}:  # another record claims one of these files
        doomed |= set(records.pop(other, {}).get("outputs", []))
    records[slot] = {"key": key, "outputs": outs}
    owner.update(dict.fromkeys(outs, slot))
    return _drop(samples, doomed) > 0


def reconcile(samples: Path, jobs: dict[str, list[Job]]) -> dict[str, dict[str, int]]:
    """Before sampling: delete the images of every job drawn for something else (`stale`: drawn again) and
    those of prompts a suite no longer has (`dropped`: the official scorers read whole folders); record the
    jobs. Counts per suite."""
    path = samples / JOBS_FILE
    records = _load(path)
    owner = {o: slot for slot, r in records.items() for o in r.get("outputs", [])}
    counts: dict[str, dict[str, int]] = {}
    for suite, suite_jobs in jobs.items():
        stale = sum(_claim(samples, records, owner, job) for job in suite_jobs)
        slots = {j.outputs[0].relative_to(samples).as_posix() for j in suite_jobs}
        gone = [s for s in records if s.startswith(f"{suite}/") and s not in slots]
        dropped = sum(_drop(samples, set(records.pop(s).get("outputs", []))) > 0 for s in gone)
        counts[suite] = {"stale": stale, "dropped": dropped}
    storage.write_json(str(path), records)  # only after the deletions: a kill in between redraws, never mixes
    return counts


def digest(jobs: list[Job]) -> str:
    """One hash of a suite's prompts as sampled (its prompt source's content, after --limit)."""
    return hashlib.sha256("\n".join(job_key(j) for j in jobs).encode()).hexdigest()[:16]
