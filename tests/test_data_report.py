"""The filter report as a reviewer reads it, in headless Chromium: examples of every reject reason with the
measured value that failed (checked against the shards themselves), duplicates beside the kept sample they
duplicate, and charts whose labels do not overlap and whose histograms stay readable on skewed data.

Geometry comes from the rendered page: a copy of the report gets a script that writes every chart label's
and picture's box (getBoundingClientRect) into the DOM, which Chromium dumps.
"""
from __future__ import annotations

import html
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.synth import DEFECTS, synth
from tests.repo_helpers import chromium_dom

EXAMPLES = 3  # FilterConfig.examples_per_reason's default
GEOMETRY_JS = """<script>
const box = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
const out = {svgs: [...document.querySelectorAll('svg')].map(s => ({label: s.getAttribute('aria-label'),
  box: box(s), texts: [...s.querySelectorAll('text')].map(t => [t.textContent, ...box(t)]),
  bars: [...s.querySelectorAll('rect')].map(r => r.getBoundingClientRect().height)})),
  pairs: [...document.querySelectorAll('figure.pair')].map(f => ({key: f.dataset.key,
    dup: box(f.querySelector('.dup img, .dup .tile')), orig: box(f.querySelector('.orig img'))})),
  imgs: [...document.querySelectorAll('figure img')].map(i => [i.naturalWidth, ...box(i)])};
const pre = document.createElement('pre'); pre.id = 'geometry'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script></body>"""


def _samples(shard: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, members) in tar order, straight from the tar (the oracle: no fusedit reader)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key or ext in out[-1][1]:
                out.append((key, {}))
            out[-1][1][ext] = t.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    summary = synth(str(root / "synth"), samples=200, seed=3, shard_size=100, bad_fraction=0.1)
    filter_shards(FilterConfig(input=str(root / "synth"), output=str(root / "out"), workers=1))
    shards = {p.name: _samples(p) for p in sorted((root / "synth").glob("*.tar"))}
    return root, summary, shards


@pytest.fixture(scope="module")
def rendered(run, tmp_path_factory):
    root, _, _ = run
    page = tmp_path_factory.mktemp("page") / "index.html"
    shutil.copyfile(root / "out" / "report" / "index.html", page)
    page.write_text(page.read_text().replace("</body>", GEOMETRY_JS))
    dom = chromium_dom(page, tmp_path_factory.mktemp("profile"))
    geometry = json.loads(html.unescape(re.search(r'<pre id="geometry">(.*?)</pre>', dom, re.S).group(1)))
    return dom, geometry


def _sections(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<section class="reason" data-reason="([^"]+)">(.*?)</section>', dom, re.S))


def _figures(section: str) -> list[tuple[str, str, str]]:
    """(key, shard, inner html) of each example."""
    return re.findall(r'<figure class="ex[^"]*" data-key="([^"]+)" data-shard="([^"]+)"[^>]*>(.*?)</figure>',
                      section, re.S)


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def _defect(shards, shard: str, key: str) -> str | None:
    metas = [json.loads(m["json"]) for k, m in shards[shard] if k == key]
    return metas[-1]["defect"]  # a reused key (duplicate_key) is the later sample


def _image(members: dict[str, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(members.get("image.jpg") or members["png"]))


def _members(shards, shard: str, key: str) -> dict[str, bytes]:
    return [m for k, m in shards[shard] if k == key][-1]


def _expected_value(reason: str, members: dict[str, bytes]) -> str:
    """The measured value a reviewer must see, computed from the sample's own bytes."""
    if reason == "too_small":
        return "{}x{}".format(*_image(members).size)
    if reason == "bad_aspect":
        w, h = _image(members).size
        return f"aspect {w / h:.3f}"
    if reason == "caption_too_long":
        return f"{len(' '.join(members['synthetic_caption.txt'].decode().split()))} characters"
    if reason == "empty_image":
        return "0 bytes"
    return ""


@pytest.mark.slow
def test_every_reject_reason_has_examples_with_key_shard_and_measured_value(run, rendered):
    _, summary, shards = run
    dom, _ = rendered
    sections = _sections(dom)
    assert set(sections) == set(summary["expected_rejects"])
    for reason, n in summary["expected_rejects"].items():
        figs = _figures(sections[reason])
        assert f"({n} rejected, {min(n, EXAMPLES)} shown)" in sections[reason]
        assert len(figs) == min(n, EXAMPLES), reason
        for key, shard, inner in figs:
            defect = _defect(shards, shard, key)
            assert DEFECTS[defect] == reason, (reason, key, defect)  # the right sample, in the named shard
            assert _expected_value(reason, _members(shards, shard, key)) in _text(inner), (reason, inner)
            has_img = "<img" in inner
            if reason in ("decode_error", "empty_image", "decompression_bomb"):
                assert not has_img and "cannot decode" in inner
            elif reason == "missing_image":
                assert not has_img and "no image" in inner
            elif reason != "duplicate_key":
                assert has_img, reason  # decoded before it failed: a thumbnail


@pytest.mark.slow
def test_duplicates_are_shown_beside_the_kept_sample_they_duplicate(run, rendered):
    _, _, shards = run
    dom, geo = rendered
    sections = _sections(dom)
    by_key = {k: (name, m) for name, samples in shards.items() for k, m in samples}
    for reason in ("exact_duplicate", "near_duplicate"):
        for key, shard, inner in _figures(sections[reason]):
            original = re.search(r'data-original="([^"]+)"', sections[reason].split(f'data-key="{key}"')[1]).group(1)
            dup, orig = _members(shards, shard, key), by_key[original][1]
            assert json.loads(orig["json"])["defect"] is None  # the original is a clean, kept sample
            if reason == "exact_duplicate":
                assert dup["image.jpg"] == orig["image.jpg"]
            else:
                assert dup["synthetic_caption.txt"] == orig["synthetic_caption.txt"]
                distance = int(re.search(r"distance (\d+) <= 4", _text(inner)).group(1))
                assert 0 <= distance <= 4
            assert inner.count("<img") == 2
    assert len(geo["pairs"]) >= 2
    for p in geo["pairs"]:
        (dl, dt, dr, _), (ol, ot, orr, ob) = p["dup"], p["orig"]
        assert abs(dt - ot) < 2 and ol >= dr and ol - dl <= 140, p  # side by side: the next 128 px cell
        assert orr - ol > 20 and ob - ot > 20, p  # and a visible picture


@pytest.mark.slow
def test_chart_labels_do_not_overlap_and_stay_inside_their_chart(rendered):
    _, geo = rendered
    assert len(geo["svgs"]) >= 5
    for svg in geo["svgs"]:
        left, top, right, bottom = svg["box"]
        boxes = svg["texts"]
        assert boxes, svg["label"]
        for text, x0, y0, x1, y1 in boxes:
            inside = left - 0.5 <= x0 and x1 <= right + 0.5 and top - 0.5 <= y0 and y1 <= bottom + 0.5
            assert inside, (svg["label"], text)
        for i, (ta, *a) in enumerate(boxes):
            for tb, *b in boxes[i + 1:]:
                overlap = min(a[2], b[2]) - max(a[0], b[0]) > 0.5 and min(a[3], b[3]) - max(a[1], b[1]) > 0.5
                assert not overlap, f"{svg['label']}: {ta!r} overlaps {tb!r}"
    reasons = next(s for s in geo["svgs"] if s["label"] == "Reject reasons")
    assert sum(t[0] in DEFECTS.values() for t in reasons["texts"]) == 13  # every reason labelled


@pytest.mark.slow
def test_skewed_caption_lengths_stay_readable_with_an_overflow_bucket(run, rendered):
    root, summary, shards = run
    _, geo = rendered
    chart = next(s for s in geo["svgs"] if s["label"].startswith("Caption length (chars)"))
    tallest = max(chart["bars"])
    visible = [h for h in chart["bars"] if h > 0.1 * tallest]
    assert len(visible) >= 5, chart["bars"]  # not one tall bar with everything else flattened
    captions = [m["synthetic_caption.txt"] for s in shards.values() for _, m in s if "synthetic_caption.txt" in m]
    longest = max(len(" ".join(c.decode("utf-8", "replace").split())) for c in captions)
    assert longest > 2000 and any(t[0].startswith(">") for t in chart["texts"])  # the outlier: an overflow bar
    axis = [float(t[0]) for t in chart["texts"] if re.fullmatch(r"[0-9.]+", t[0])]
    assert axis and max(axis) < longest / 4  # ... instead of stretching the axis to it


def test_report_is_one_self_contained_file_of_bounded_size(run):
    root, summary, _ = run
    page = (root / "out" / "report" / "index.html").read_text()
    assert not re.search(r'src="(?!data:)', page)
    n_imgs = page.count("data:image/jpeg;base64,")
    bound = 24 + 2 * EXAMPLES * len(summary["expected_rejects"])  # kept grid + examples (and originals)
    assert 24 <= n_imgs <= bound
    assert len(page.encode()) < 400_000
