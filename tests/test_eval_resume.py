"""Resuming an evaluation keeps exactly the images that are still right, and never mixes.

A prompt that moved or changed is drawn again (its old images deleted, extras included), the rest is kept
untouched; other pipeline weights are recognised by content (a copy with new mtimes resumes, weights
rewritten in place with the same size and mtime are refused).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.run import evaluate
from fusedit.errors import UserError
from tests.eval_helpers import export_tiny

FAST = dict(steps=2, progress=False, batch_size=8)
ROWS = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
        {"tag": "counting", "include": [{"class": "clock", "count": 2}], "prompt": "a photo of two clocks"}]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, tiny_dir):
    return export_tiny(tmp_path_factory.mktemp("pipe") / "pipeline", tiny_dir)


def _write_meta(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((folder / "samples").glob("*.png"))}


def _close(a, b):
    return a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)


def test_reordered_geneval_metadata_redraws_the_moved_prompts_only(tmp_path, pipe_dir):
    meta = tmp_path / "evaluation_metadata.jsonl"
    _write_meta(meta, ROWS)
    cfg = EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), suites=["geneval"],
                     geneval_metadata=str(meta), geneval_images_per_prompt=2, **FAST)
    evaluate(cfg)
    out = tmp_path / "run" / "samples" / "geneval"
    first = [_pixels(out / f"{i:05d}") for i in range(3)]
    assert not _close(first[0], first[1])  # two prompts from one seed: different images, so a mix-up shows
    kept = {p: p.stat().st_mtime_ns for p in (out / "00002" / "samples").iterdir()}
    # what GenEval's evaluate_images.py writes for these images: one row per image, 5 of 6 correct
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps({"filename": str(png), "tag": ROWS[i]["tag"], "prompt": ROWS[i]["prompt"],
                                           "correct": (i, png.name) != (2, "00001.png")}) + "\n"
                               for i in range(3) for png in sorted((out / f"{i:05d}" / "samples").iterdir())))
    scored = evaluate(cfg.model_copy(update={"geneval_results": str(results)}))
    assert scored.metrics["geneval"]["overall"] == pytest.approx((1 + 1 + 0.5) / 3)

    _write_meta(meta, [ROWS[1], ROWS[0], ROWS[2]])
    again = evaluate(cfg)
    assert again.sampling["geneval"] == {"jobs": 3, "generated": 4, "skipped": 1, "stale": 2, "dropped": 0}
    # GenEval seeds every prompt alike: a prompt's images are the same whichever folder holds them
    assert _close(_pixels(out / "00000"), first[1]) and _close(_pixels(out / "00001"), first[0])
    assert json.loads((out / "00000" / "metadata.jsonl").read_text())["prompt"] == ROWS[1]["prompt"]
    assert {p: p.stat().st_mtime_ns for p in (out / "00002" / "samples").iterdir()} == kept
    with pytest.raises(UserError, match="00000/samples/00000.png was scored for 'a photo of a bench', but folder "
                                        "00000 now holds 'a photo of a red car'; score the images again"):
        evaluate(cfg.model_copy(update={"geneval_results": str(results)}))


def test_fewer_images_or_prompts_leave_no_extra_images_for_the_scorer(tmp_path, pipe_dir):
    """GenEval's evaluate_images.py scores every <digits>.png of every folder: old extras must go."""
    meta = tmp_path / "evaluation_metadata.jsonl"
    _write_meta(meta, ROWS[:2])
    cfg = EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), suites=["geneval"],
                     geneval_metadata=str(meta), geneval_images_per_prompt=3, **FAST)
    evaluate(cfg)
    res = evaluate(cfg.model_copy(update={"geneval_images_per_prompt": 1}))
    out = tmp_path / "run" / "samples" / "geneval"
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["00000.png"]
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["00000.png"]
    assert res.sampling["geneval"]["stale"] == 2 and res.metrics["geneval"]["images"] == 2
    results = tmp_path / "results.jsonl"  # scored before the change: rows for the three images of each prompt
    results.write_text("".join(json.dumps({"filename": f"/elsewhere/{i:05d}/samples/{k:05d}.png", "tag": ROWS[i]["tag"],
                                           "prompt": ROWS[i]["prompt"], "correct": True}) + "\n"
                               for i in range(2) for k in range(3)))
    with pytest.raises(UserError, match="00000/samples/00001.png is no longer among the samples"):
        evaluate(cfg.model_copy(update={"geneval_images_per_prompt": 1, "geneval_results": str(results)}))
    # a shorter prompt list: the images of the prompts left out go too, since the scorer reads every folder
    res = evaluate(cfg.model_copy(update={"geneval_images_per_prompt": 1, "limit": 1}))
    assert res.sampling["geneval"] == {"jobs": 1, "generated": 0, "skipped": 1, "stale": 0, "dropped": 1}
    assert not list((out / "00001" / "samples").iterdir()) and (out / "00000" / "samples" / "00000.png").is_file()


def test_an_edited_dpg_prompt_redraws_its_grid_and_keeps_the_others(tmp_path, pipe_dir):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a red circle above a blue square")
    (prompts / "b.txt").write_text("three green stars")
    cfg = EvalConfig(pipeline=str(pipe_dir), output=str(tmp_path / "run"), suites=["dpg"],
                     dpg_prompts=str(prompts), **FAST)
    evaluate(cfg)
    out = tmp_path / "run" / "samples" / "dpg"
    before = {n: (out / n).read_bytes() for n in ("a.png", "b.png")}
    mtime_a = (out / "a.png").stat().st_mtime_ns
    (prompts / "b.txt").write_text("a yellow triangle")
    res = evaluate(cfg)
    assert res.sampling["dpg"] == {"jobs": 2, "generated": 4, "skipped": 1, "stale": 1, "dropped": 0}
    assert (out / "a.png").stat().st_mtime_ns == mtime_a and (out / "a.png").read_bytes() == before["a.png"]
    assert (out / "b.png").read_bytes() != before["b.png"]


def _rewrite_in_place(path):
    """Swap two differing 4-byte words of tensor data; keep the size and the modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, header, data
    i = len(data) - 8
    while data[i:i + 4] == data[i + 4:i + 8]:
        i -= 4
        assert i >= start
    data[i:i + 4], data[i + 4:i + 8] = data[i + 4:i + 8], data[i:i + 4]
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_pipeline_weights_are_recognised_by_content(tmp_path, pipe_dir):
    copy = tmp_path / "copy"
    shutil.copytree(pipe_dir, copy, copy_function=shutil.copyfile)  # same bytes, new modification times
    base = dict(output=str(tmp_path / "run"), synthetic_per_category=1, **FAST)
    evaluate(EvalConfig(pipeline=str(pipe_dir), **base))
    res = evaluate(EvalConfig(pipeline=str(copy), **base))
    assert res.sampling["synthetic"] == {"jobs": 6, "generated": 0, "skipped": 6, "stale": 0, "dropped": 0}
    weights = max(copy.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    _rewrite_in_place(weights)
    with pytest.raises(UserError, match=r"images were drawn with other settings \(pipeline differ\)") as err:
        evaluate(EvalConfig(pipeline=str(copy), **base))
    assert "\n" not in str(err.value)
