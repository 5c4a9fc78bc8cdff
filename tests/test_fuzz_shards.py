"""Property tests: shard parsing and the filter on hostile input never crash, hang or lose a sample.

The tar reader must agree with Python's `tarfile` on every well-formed archive (USTAR, GNU long names,
pax headers, links, devices, directories) and report anything else as a `ShardError`. The filter, fed random
bytes as images, random text and invalid UTF-8 as captions, random keys (`../x`, absolute paths, control
characters, non-UTF-8 names) and damaged tars, accounts for every sample: kept in an output shard (exactly once)
whose member names are safe relative paths, or listed in rejects.jsonl with a known reason.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusedit.components.data.checks import REASONS, printable_key
from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig, QualityThresholds
from fusedit.components.shared.tario import ShardError, iter_members, iter_samples, split_name, unsafe_key
from tests.fuzzing import fuzz_case, fuzz_examples, no_hang

# ---------------------------------------------------------------- strategies

KEY_PARTS = st.sampled_from(["a", "b", "x1", "dir/s", "..", "/etc/x", "../up", "a/../b", "\\win", "t\x01ab",
                             "é", "long" * 40, "", "."])
KEYS = st.one_of(KEY_PARTS, st.text(min_size=0, max_size=12), st.binary(max_size=8).map(
    lambda b: b.decode("utf-8", "surrogateescape")))
EXTS = st.sampled_from(["jpg", "png", "image.jpg", "txt", "synthetic_caption.txt", "json", "webp", "cls"])


@st.composite
def images(draw) -> bytes:
    """A real image in a random format and mode, possibly cut or with flipped bytes, or plain random bytes."""
    kind = draw(st.sampled_from(["image", "image", "cut", "flip", "random", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return b""
    w, h = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "CMYK", "LA", "I;16"]))
    fmt = draw(st.sampled_from(["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]))
    buf = io.BytesIO()
    img = Image.new(mode, (w, h), draw(st.integers(0, 255)))
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):
        img.convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    if kind == "cut":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    return data


CAPTIONS = st.one_of(st.text(max_size=60).map(str.encode), st.binary(max_size=40),
                     st.sampled_from([b"", b"   \n\t", b"\xff\xfe bad", b"ok caption", "x" * 3000]).map(
                         lambda v: v if isinstance(v, bytes) else v.encode()))


CLEAN = "\x00clean"  # marks a clean sample until `numbered` makes it (key and image) unique


@st.composite
def clean_samples(draw) -> tuple[str, tuple]:
    """A sample the filter keeps (once `numbered`): a whole RGB image and a caption, its key and image unique."""
    fmt = draw(st.sampled_from(["JPEG", "PNG"]))
    ext = draw(st.sampled_from(["jpg", "image.jpg"] if fmt == "JPEG" else ["png"]))
    return CLEAN, (draw(st.sampled_from(["", "dir/", "é"])), draw(st.integers(8, 24)), draw(st.integers(8, 24)),
                   draw(st.integers(0, 255)), fmt, ext,
                   draw(st.sampled_from(["a red box", "two green circles left of a star", "é ü 漢字"])))


def numbered(shards: list[list[tuple[str, object]]]) -> list[list[tuple[str, dict[str, bytes]]]]:
    out = []
    for i, items in enumerate(shards):
        out.append([])
        for j, (key, members) in enumerate(items):
            if key == CLEAN:
                prefix, w, h, grey, fmt, ext, caption = members
                img = Image.new("RGB", (w, h), (grey, grey, grey))
                img.putpixel((0, 0), (i * 16, j * 16, 255 - grey))  # no two clean images are the same
                buf = io.BytesIO()
                img.save(buf, fmt)
                key, members = f"{prefix}c{i}-{j}", {ext: buf.getvalue(), "synthetic_caption.txt": caption.encode()}
            out[-1].append((key, members))
    return out


@st.composite
def samples(draw) -> tuple[str, dict[str, bytes]]:
    """Mostly hostile (random keys, images, captions); a third clean, so that samples are kept too."""
    if draw(st.integers(0, 2)) == 0:
        return draw(clean_samples())
    key = draw(KEYS)
    members: dict[str, bytes] = {}
    if draw(st.integers(0, 9)) > 0:
        members[draw(st.sampled_from(["jpg", "png", "image.jpg", "webp"]))] = draw(images())
    if draw(st.integers(0, 9)) > 0:
        members[draw(st.sampled_from(["synthetic_caption.txt", "txt"]))] = draw(CAPTIONS)
    if draw(st.booleans()):
        members[draw(EXTS)] = draw(st.binary(max_size=20))
    return key, members


def raw_tar(entries: list[tuple[str, bytes, bytes]], fmt: int) -> bytes:
    """A tar written by Python's tarfile: (name, type, data) with regular files, links, devices and dirs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as t:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "../../etc/passwd"
            if kind in (tarfile.REGTYPE, tarfile.CONTTYPE):
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return buf.getvalue()


def sample_keys(names: list[str]) -> list[str]:
    """The key of each sample in a shard with these member names, in order (a sample's index in the shard is
    its position): consecutive members with one key form a sample until a field repeats (WebDataset)."""
    keys, key, fields = [], None, set()
    for name in names:
        mk, me = split_name(name.split("\x00", 1)[0])  # a tar name ends at its first NUL
        if mk != key or me in fields:
            keys.append(mk)
            key, fields = mk, set()
        fields.add(me)
    return keys


def input_keys(items: list[tuple[str, dict[str, bytes]]]) -> list[str]:
    return sample_keys([f"{k}.{ext}" for k, members in items for ext in members])


def output_keys(blob: bytes) -> list[str]:
    """The sample keys of an output shard, checking that every member is a file with a safe relative name."""
    with tarfile.open(fileobj=io.BytesIO(blob), encoding="utf-8", errors="surrogateescape") as t:
        members = t.getmembers()
    for m in members:
        assert m.isreg() and unsafe_key(m.name) is None, m.name
        assert not Path(m.name).is_absolute() and ".." not in Path(m.name).parts, m.name
    return sample_keys([m.name for m in members])


def sample_tar(items: list[tuple[str, dict[str, bytes]]], fmt: int) -> bytes:
    return raw_tar([(f"{k}.{ext}", tarfile.REGTYPE, data) for k, m in items for ext, data in m.items()], fmt)


FORMATS = st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE])
NAMES = st.one_of(st.builds(lambda k, e: f"{k}.{e}", KEYS, EXTS), st.text(min_size=1, max_size=150))


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    """The archive cut short, with flipped bytes, with garbage appended, or left alone."""
    how = draw(st.sampled_from(["none", "cut", "flip", "append", "zero-header-size"]))
    if how == "cut":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if how == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:]
    if how == "append":
        return blob + draw(st.binary(min_size=1, max_size=1200))
    if how == "zero-header-size":  # a pax header whose record claims length 0 (once looped forever)
        body = b"0 path=x\n"
        hdr = bytearray(tarfile.TarInfo("././@PaxHeader").tobuf(tarfile.USTAR_FORMAT))
        hdr[156:157] = b"x"
        hdr[124:136] = b"%011o\0" % len(body)
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        return bytes(hdr) + body + bytes(-len(body) % 512) + blob
    return blob


# ---------------------------------------------------------------- the tar reader

@settings(max_examples=fuzz_examples(150))
@given(st.binary(max_size=3000), st.integers(1, 4096))
def test_reader_random_bytes_yield_samples_or_shard_error(blob, limit):
    fuzz_case()
    with no_hang(20):
        try:
            for s in iter_samples(io.BytesIO(blob), max_member_bytes=limit):
                assert isinstance(s.key, str)
        except ShardError:
            pass


@settings(max_examples=fuzz_examples(100))
@given(st.lists(st.tuples(NAMES, KINDS, st.binary(max_size=700)), max_size=6), FORMATS, st.data())
def test_reader_agrees_with_tarfile_and_reports_damage(entries, fmt, data):
    """Undamaged: exactly tarfile's regular files, in order; links, devices and dirs never become members."""
    fuzz_case()
    blob = raw_tar(entries, fmt)
    broken = data.draw(damaged(blob))
    with no_hang(20):
        try:
            got = list(iter_members(io.BytesIO(broken), max_member_bytes=1 << 20))
        except ShardError:
            got = None
    if broken == blob:
        with tarfile.open(fileobj=io.BytesIO(blob), encoding="utf-8", errors="surrogateescape") as t:
            want = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isreg()]
        # names end at their first NUL in every header kind (tarfile keeps a NUL inside a pax path)
        assert got is not None and [(n.rstrip("/"), d) for n, d in got] == [
            (n.split("\x00", 1)[0].rstrip("/"), d) for n, d in want]


# ---------------------------------------------------------------- the filter

def _run_filter(root: Path, shards: list[bytes]) -> tuple[list[str], dict, list[dict], list[bytes]]:
    src = root / "in"
    src.mkdir()
    uris = []
    for i, blob in enumerate(shards):
        (src / f"s-{i:03d}.tar").write_bytes(blob)
        uris.append(str(src / f"s-{i:03d}.tar"))
    cfg = FilterConfig(input=str(src), output=str(root / "out"), min_side=4, workers=1, report=False,
                       dedupe_near=False, max_member_bytes=4096, samples_per_shard=5,
                       quality=QualityThresholds(max_reject_rate=1, max_duplicate_rate=1, max_decode_failure_rate=1))
    with no_hang(60):
        filter_shards(cfg)
    out = root / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    tars = [p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))]
    return uris, metrics, rejects, tars


@settings(max_examples=fuzz_examples(40), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(samples(), min_size=1, max_size=4), min_size=1, max_size=3).map(numbered), FORMATS,
       st.data())
def test_filter_keeps_or_rejects_every_sample_with_a_reason(tmp_path_factory, shards, fmt, data):
    """Every sample read is in the output exactly once or in rejects.jsonl with a reason: none lost, none twice.

    Samples of an intact shard are known exactly (key and index); those of a damaged one are counted only."""
    fuzz_case()
    blobs = [data.draw(damaged(sample_tar(items, fmt))) if data.draw(st.integers(0, 3)) == 0
             else sample_tar(items, fmt) for items in shards]
    intact = [b == sample_tar(items, fmt) for b, items in zip(blobs, shards, strict=True)]
    uris, metrics, rejects, tars = _run_filter(tmp_path_factory.mktemp("f"), blobs)

    assert metrics["n_in"] == metrics["n_kept"] + metrics["n_rejected"]
    sample_rejects = [r for r in rejects if r["reason"] != "bad_shard"]
    assert len(sample_rejects) == metrics["n_rejected"]
    assert all(r["reason"] in REASONS and r["detail"] for r in sample_rejects)
    assert sum(r["reason"] == "bad_shard" for r in rejects) == metrics["n_bad_shards"] <= intact.count(False)
    rejected = {(r["shard"], r["index"]): r for r in sample_rejects}
    assert len(rejected) == len(sample_rejects), "a sample rejected twice"
    assert all(r["shard"] in uris and isinstance(r["index"], int) for r in sample_rejects)

    # an intact shard's samples: each one rejected (under its own key) or kept
    kept, n_intact = [], 0
    for uri, items, ok in zip(uris, shards, intact, strict=True):
        if not ok:
            continue
        keys = input_keys(items)
        n_intact += len(keys)
        assert all(i < len(keys) for s, i in rejected if s == uri), "a reject that names no sample of the shard"
        for index, key in enumerate(keys):
            if (uri, index) in rejected:
                assert rejected[uri, index]["key"] == printable_key(key), (uri, index)
            else:
                kept.append(key)
    if all(intact):
        assert metrics["n_in"] == n_intact

    out = [key for blob in tars for key in output_keys(blob)]
    assert len(out) == metrics["n_kept"], f"{metrics['n_kept']} kept, {len(out)} samples in the output"
    lost = Counter(kept) - Counter(out)
    assert not lost, f"kept samples missing from the output: {sorted(lost.elements())}"
    if all(intact):  # and nothing else: no sample twice, none made up
        assert Counter(out) == Counter(kept)
    unsafe = [r for r in sample_rejects if r["reason"] == "unsafe_key"]
    assert all(r["key"] is not None for r in unsafe)
