"""SIGKILL each step in the middle of its work, rerun it, and get exactly the uninterrupted result by resuming.

Steps: filter (`fusedit data filter`), cache build (`fusedit cache build`), both training stages
(`fusedit train`), export (the end of a stage) and evaluation sampling (`fusedit eval run`). Every kill
lands at a point of progress, not after a guessed delay: the moment the k-th shard's done-marker, the
checkpoint of step s, the half-written export or the k-th image appears, so it lands mid-work on any
machine. After every kill the test asserts the work was in flight (killed by the signal, some of the work
durable, not all of it, nothing half-written that looks complete); after every rerun that the durable work
was reused, not redone (done-markers and images untouched, the resume lines, `(N reused)`, timing.json's
start_step). After the final rerun the outputs are compared with an uninterrupted run (bytes where the step
is deterministic, the loss curve and weights for training). A step that redoes everything from scratch
fails here.
"""
from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import pytest
import yaml

from fusedit.components.shared.tario import iter_samples
from fusedit.components.train import checkpoint
from tests.cache_helpers import DEEP, cli_sets, recipe_overrides, tree
from tests.fault_helpers import Run

RUN_FACTS = "timing.json"  # how the run went (seconds, images/s, workers, resumed step): the one file that differs
KILLED = -signal.SIGKILL
Stamps = dict[str, tuple[int, int]]


def _stamps(root: Path, pattern: str) -> Stamps:
    """(inode, mtime in ns) of every file matching pattern under root: a rewritten file changes either."""
    out = {}
    for p in sorted(root.glob(pattern)) if root.exists() else []:
        try:
            st = p.stat()
        except FileNotFoundError:  # removed between the listing and the stat (a rename, a prune)
            continue
        out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    return out


def _untouched(before: Stamps, after: Stamps) -> None:
    """Every file of `before` is still there, never rewritten."""
    redone = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not redone, f"finished work redone (or lost) by the rerun: {redone}"


def _strict_count(path: Path) -> int:
    """Samples in a tar, read with the strict reader (a cut-off tar raises)."""
    with open(path, "rb") as f:
        return sum(1 for _ in iter_samples(f))


def _untimed(files: dict[str, bytes]) -> dict[str, bytes]:
    """Every output file but the run's timing record, byte for byte."""
    return {k: v for k, v in files.items() if Path(k).name != RUN_FACTS}


# ------------------------------------------------------------------ filter

@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    from fusedit.components.data.synth import synth

    root = tmp_path_factory.mktemp("kill-synth")
    synth(str(root), samples=96, seed=3, shard_size=12, bad_fraction=0.1, short_side=(32, 48))
    return root


def _filter_run(out: Path, synth_dir: Path, tmp: Path) -> Run:
    cfg = tmp / "filter.yaml"
    cfg.write_text(yaml.safe_dump({"report": False, "min_side": 16, "samples_per_shard": 10, "workers": 2}))
    return Run(["data", "filter", "--input", str(synth_dir), "--output", str(out), "--config", str(cfg)],
               tmp / f"{out.name}.log", log_level=logging.INFO)  # INFO: its "resuming: N of M" line


def _check_filter(out: Path) -> None:
    """A done-marker means its work files are whole; a manifest means every listed file is whole."""
    for done in (out / ".work").glob("*/done.json"):
        rec = json.loads(done.read_text())
        rows = (done.parent / "rows.jsonl").read_text().splitlines()
        assert len(rows) == rec["n"]
        kept = sum(json.loads(r)["decision"] == "kept" for r in rows)
        assert _strict_count(done.parent / "kept.tar") == kept
    for shard in (out / "shards").glob("*.tar"):
        _strict_count(shard)  # a published name is never a cut-off tar
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        assert all((out / f).is_file() for f in m["files"])
        assert sum(_strict_count(out / "shards" / Path(s).name) for s in m["result"]["shards"]) == \
            m["result"]["n_kept"]


FILTER_KILLS = (2, 4, 6)  # input shards (of 8) done when each kill lands: early, middle, late


def test_filter_killed_mid_work_resumes_to_the_same_bytes(tmp_path, synth_dir):
    out, ref = tmp_path / "out", tmp_path / "ref"
    run = _filter_run(out, synth_dir, tmp_path)
    run.complete()
    out.rename(ref)  # the same output path again: paths are part of the manifest
    n = len(json.loads((ref / "manifest.json").read_text())["inputs"])
    assert n == 8 and (ref / "shards").is_dir() and not (ref / ".work").exists()

    done: Stamps = {}
    for k in FILTER_KILLS:  # each kill resumes the last one's work
        assert len(done) < k
        assert run.kill_when(lambda k=k: len(_stamps(out / ".work", "*/done.json")) >= k) == KILLED
        now = _stamps(out / ".work", "*/done.json")
        # in flight: some shards' work durable, not all of it, nothing published
        assert k <= len(now) < n and not (out / "manifest.json").exists(), (k, sorted(now))
        if done:  # reused: the shards done before this run were reported done and never redone
            assert run.said(f"resuming: {len(done)} of {n} shards already done"), run.tail()
            _untouched(done, now)
        _check_filter(out)
        done = now
    run.complete()
    assert run.said(f"resuming: {len(done)} of {n} shards already done"), run.tail()
    got, want = tree(out), tree(ref)
    assert sorted(got) == sorted(want) and any(Path(k).name == RUN_FACTS for k in got)
    assert _untimed(got) == _untimed(want)  # metrics, manifest and report included: no wall-clock in them


# ------------------------------------------------------------------ cache build

def _check_cache(out: Path) -> None:
    """A shard's done-marker means its tar is whole; a manifest means every shard is."""
    for done in (out / "shards").glob("*.json"):
        rec = json.loads(done.read_text())
        tar = out / rec["name"]
        assert tar.stat().st_size == rec["bytes"] and _strict_count(tar) == rec["n"]
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        assert sum(_strict_count(out / s["name"]) for s in m["shards"]) == m["n_samples"]


CACHE_KILLS = (2, 4, 6)  # shards (of 8) with a done-marker when each kill lands: early, middle, late


def test_cache_build_killed_mid_work_resumes_to_the_same_bytes(tmp_path, tiny_dir):
    from tests.cache_helpers import make_shards

    shards = make_shards(tmp_path / "in", samples=24, shard_size=3)
    out, ref = tmp_path / "out", tmp_path / "ref"
    run = Run(["cache", "build", "--input", str(shards), "--output", str(out), "--recipe", DEEP, "--batch-size", "2",
               *cli_sets(recipe_overrides(DEEP, tiny_dir, vae=True))], tmp_path / "cache.log")
    run.complete()
    out.rename(ref)
    n = len(json.loads((ref / "manifest.json").read_text())["shards"])
    assert n == 8

    done: Stamps = {}
    for k in CACHE_KILLS:  # each kill resumes the last one's work
        assert len(done) < k
        assert run.kill_when(lambda k=k: len(_stamps(out / "shards", "*.json")) >= k) == KILLED
        now = _stamps(out / "shards", "*.json")
        # in flight: some shards encoded and marked done, not all, no manifest
        assert k <= len(now) < n and not (out / "manifest.json").exists(), (k, sorted(now))
        _untouched(done, now)  # reused: a marked shard is never encoded again
        _check_cache(out)
        done = now
    tars = _stamps(out / "shards", "*.tar")
    run.complete()
    assert run.said(f"in {n} shards ({len(done)} reused)"), run.tail()  # BuildResult.shards_reused
    _untouched(done, _stamps(out / "shards", "*.json"))
    _untouched({k: v for k, v in tars.items() if k.replace(".tar", ".json") in done}, _stamps(out / "shards", "*.tar"))
    assert tree(out) == tree(ref)  # byte for byte: no shard lost, none written twice


# ------------------------------------------------------------------ training stages and export

def _train_params(tmp: Path) -> Path:
    stages = [
        {"name": "base", "steps": 8, "batch_size": 4, "save_every": 2, "ema_every": 2, "log_every": 1,
         "keep_last": 2, "sample_prompts": ["a red square"]},
        {"name": "joint", "steps": 4, "batch_size": 4, "trains": "dit+llm", "llm_lr": 1e-3, "init_from": "base",
         "save_every": 2, "ema_every": 2, "sample_prompts": ["a red square"]},
    ]
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"seed": 5, "stages": stages}}))
    return p


def _train_run(tmp: Path, tiny_dir: Path, data: Path, out: Path, stage: str) -> Run:
    return Run(["train", "--recipe", "tiny", "--stage", stage, "--data", str(data), "--output", str(out / stage),
                "--params", str(_train_params(tmp)), "--set", f"model.llm={tiny_dir / 'gemma'}",
                "--set", "model.resolution=16", "--set", "model.max_prompt_length=16"], tmp / f"{stage}.log")


def _check_stage(out: Path) -> None:
    """Every committed checkpoint verifies; an exported pipeline is there whole or not at all."""
    root = out / "checkpoints"
    for step in checkpoint.steps(str(root)) if root.exists() else []:
        if (root / f"step-{step:08d}" / checkpoint.MARKER).exists():
            checkpoint._load_step(str(root), step)  # raises on a size/checksum mismatch
    if (out / "loss.tsv").exists():
        rows = (out / "loss.tsv").read_text().splitlines()
        assert rows[0].startswith("step\t") and all(len(r.split("\t")) == 3 for r in rows[1:])
    if (out / "pipeline").exists():
        from fusedit.model.pipeline import FuseDiTPipeline

        FuseDiTPipeline.from_pretrained(str(out / "pipeline"))


def _losses(out: Path) -> list[list[str]]:
    return [ln.split("\t")[:3] for ln in (out / "loss.tsv").read_text().splitlines()[1:]]


def _same_stage(got: Path, want: Path) -> None:
    assert _losses(got) == _losses(want) and len(_losses(got)) > 0
    a, b = checkpoint.load_latest(str(got / "checkpoints")), checkpoint.load_latest(str(want / "checkpoints"))
    assert a.step == b.step and a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert all(a.tensors[name][k].equal(b.tensors[name][k]) for k in b.tensors[name]), name
    assert (got / "metrics.json").read_bytes() == (want / "metrics.json").read_bytes()
    assert tree(got / "pipeline") == tree(want / "pipeline")


def _committed(out: Path) -> int:
    """The stage's latest committed checkpoint step (0: none yet)."""
    markers = (out / "checkpoints").glob(f"step-*/{checkpoint.MARKER}")
    steps = [int(m.parent.name.removeprefix("step-")) for m in markers]
    return max(steps, default=0)


def _kill_training(run: Run, out: Path, stage: str, points: tuple[int, ...], steps: int) -> None:
    """Kill once a checkpoint of each step in `points` is committed; each rerun resumes from the last."""
    resumed = 0
    for s in points:
        assert resumed < s
        assert run.kill_when(lambda s=s: _committed(out) >= s) == KILLED
        got = _committed(out)
        # in flight: a checkpoint committed before the last step; the stage not finished (no metrics, no export)
        assert s <= got < steps and not (out / "metrics.json").exists() and not (out / "pipeline").exists(), got
        if resumed:  # reused: the rerun trained on from the last kill's checkpoint
            assert run.said(f"resuming stage '{stage}' from step {resumed}"), run.tail()
        _check_stage(out)
        resumed = got
    run.complete()
    assert json.loads((out / RUN_FACTS).read_text())["start_step"] == resumed > 0  # not trained from step 0


def _kill_export(run: Run, out: Path, ready, writing: bool, stop_after: str | None = None) -> None:
    """Kill a rerun of a finished stage (only the export is left) once it has resumed from the last step and
    `ready()` (and, with `stop_after`, has stopped itself after that function's first call); the export must
    be in flight: the run never reached its end, half a pipeline written or none."""
    facts = _stamps(out, RUN_FACTS)
    run.stop_after = stop_after
    try:
        assert run.kill_when(lambda: run.said("resuming stage 'base' from step 8") and ready()) == KILLED
    finally:
        run.stop_after = None
    _untouched(facts, _stamps(out, RUN_FACTS))  # the run never reached its end (timing.json is its last write)
    assert (out / "pipeline.part").is_dir() == writing  # half an export beside the whole old one, or none yet
    _check_stage(out)


def test_training_stages_and_export_killed_mid_work_resume_to_the_same_curve(tmp_path, tiny_dir, filtered):
    out, ref = tmp_path / "out", tmp_path / "ref"
    runs = {stage: _train_run(tmp_path, tiny_dir, filtered, out, stage) for stage in ("base", "joint")}
    for r in runs.values():
        r.complete()
    assert math.isfinite(json.loads((out / "base" / "metrics.json").read_text())["final_loss"])
    out.rename(ref)

    _kill_training(runs["base"], out / "base", "base", (2, 4, 6), 8)
    # the export (a rerun of the finished stage): as it starts, as the pipeline's files begin, and in the
    # middle of writing the model's shards
    base = out / "base"
    _kill_export(runs["base"], base, lambda: True, writing=False)
    _kill_export(runs["base"], base, lambda: (base / "pipeline.part").is_dir(), writing=True)
    _kill_export(runs["base"], base, lambda: runs["base"].said("Writing model shards"), writing=True,
                 stop_after="transformers.modeling_utils:safe_save_file")  # after the text encoder's first shard
    runs["base"].complete()
    assert runs["base"].said("resuming stage 'base' from step 8"), runs["base"].tail()
    assert json.loads((base / RUN_FACTS).read_text())["start_step"] == 8  # only the export redone
    _kill_training(runs["joint"], out / "joint", "joint", (2,), 4)
    for stage in ("base", "joint"):
        _same_stage(out / stage, ref / stage)
    assert not list((out / "base").glob("pipeline.*"))  # no temp export left behind


# ------------------------------------------------------------------ evaluation sampling

def _check_eval(out: Path) -> None:
    from PIL import Image

    for png in (out / "samples").rglob("*.png"):
        with Image.open(png) as im:
            im.load()  # a visible name is a whole image
    if (out / "metrics.json").exists():
        json.loads((out / "metrics.json").read_text())


EVAL_KILLS = (0.15, 0.45, 0.75)  # share of the images drawn when each kill lands: early, middle, late
PER_PROMPT = 2  # images per prompt: a job (one prompt) is finished when both of its images are there


def _images(out: Path) -> Stamps:
    return _stamps(out / "samples", "**/*.png")


def _finished(images: Stamps) -> Stamps:
    """The images of finished jobs (`<category>/<prompt>_<k>.png` for every k): what a rerun must keep."""
    jobs: dict[str, list[str]] = {}
    for rel in images:
        jobs.setdefault(rel.rsplit("_", 1)[0], []).append(rel)
    return {rel: images[rel] for rels in jobs.values() if len(rels) == PER_PROMPT for rel in rels}


def test_eval_sampling_killed_mid_work_resumes_to_the_same_images(tmp_path, tiny_dir):
    from tests.eval_helpers import export_tiny

    pipe = export_tiny(tmp_path / "pipeline", tiny_dir)
    out, ref = tmp_path / "out", tmp_path / "ref"
    run = Run(["eval", "run", "--pipeline", str(pipe), "--output", str(out), "--suite", "synthetic", "--steps", "3",
               "--images-per-prompt", str(PER_PROMPT), "--synthetic-per-category", "3", "--batch-size", "2",
               "--quiet"], tmp_path / "eval.log")
    run.complete()
    out.rename(ref)
    total = len(_images(ref))
    assert total > 10 and len(_finished(_images(ref))) == total

    before: Stamps = {}
    for share in EVAL_KILLS:  # each kill resumes the last one's work
        k = math.ceil(share * total)
        assert len(before) < k
        assert run.kill_when(lambda k=k: len(_images(out)) >= k) == KILLED
        now = _images(out)
        # in flight: some images drawn, not all, no scores
        assert k <= len(now) < total and not (out / "metrics.json").exists(), (k, len(now))
        _untouched(_finished(before), now)  # reused: a finished prompt's images are never drawn again
        _check_eval(out)
        before = now
    kept = _finished(before)
    run.complete()
    now = _images(out)
    _untouched(kept, now)
    redrawn = {rel for rel, st in now.items() if before.get(rel) != st}
    # exactly the missing images were drawn (a prompt cut off between its two images is drawn whole again)
    assert kept and redrawn == set(now) - set(kept) and len(redrawn) == total - len(kept)
    got, want = tree(out / "samples"), tree(ref / "samples")
    assert got == want and len(got) > 10
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
