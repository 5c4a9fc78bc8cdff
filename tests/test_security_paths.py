"""Keys in shards and names or URIs in params cannot escape their output directory.

Hostile shards carry `../` keys, absolute keys, symlinks, hardlinks and device nodes; the filter rejects
those samples with a reason and its output tars (extracted here with no protection at all) create files only
inside the extraction directory. The cache build refuses to write such a key; prompt names and stage names
that would leave their folder are user errors; an S3 prefix with `..` keys cannot write outside the
download directory.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig, QualityThresholds
from fusedit.components.shared.tario import TarSink, UnsafeKeyError
from fusedit.errors import UserError
from tests.data_helpers import jpeg

CAPTION = b"a red box on a table"
HOSTILE_KEYS = ["../escape", "/abs/olute", "a/../../b", "ok/../../x", "back\\slash", "nul\x01ctl"]


def hostile_shard(path: Path) -> Path:
    """A tar written with tarfile: good samples, hostile keys, and link/device members named like samples."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for key in ["good0", *HOSTILE_KEYS, "dir/good1"]:
            add(f"{key}.jpg", jpeg())
            add(f"{key}.synthetic_caption.txt", CAPTION)
        add("sym.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("sym.synthetic_caption.txt", CAPTION)
        add("hard.jpg", kind=tarfile.LNKTYPE, link="../../etc/shadow")
        add("hard.synthetic_caption.txt", CAPTION)
        add("dev.jpg", kind=tarfile.CHRTYPE)
        add("dev.synthetic_caption.txt", CAPTION)
        add("fifo.jpg", kind=tarfile.FIFOTYPE)
        add("fifo.synthetic_caption.txt", CAPTION)
    return path


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_filter_rejects_hostile_keys_and_link_members(tmp_path):
    (tmp_path / "in").mkdir()
    shard = hostile_shard(tmp_path / "in" / "s-000.tar")
    out = tmp_path / "deep" / "out"
    before = _files_under(tmp_path) - {shard}
    filter_shards(FilterConfig(input=str(shard), output=str(out), min_side=8, workers=1, report=False,
                               dedupe_exact=False, dedupe_near=False,
                               quality=QualityThresholds(max_reject_rate=1, max_duplicate_rate=1)))
    created = _files_under(tmp_path) - before - {shard}
    assert all(out in p.parents or p in out.parents or p == out for p in created), \
        sorted(str(p) for p in created if out not in p.parents)

    rejects = {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    for key in HOSTILE_KEYS:
        assert rejects[key]["reason"] == "unsafe_key", (key, rejects.get(key))
    for key in ("sym", "hard", "dev", "fifo"):  # the link/device member is never read: no image
        assert rejects[key]["reason"] == "missing_image", rejects[key]

    sandbox = tmp_path / "sandbox" / "x"
    sandbox.mkdir(parents=True)
    outside = _files_under(tmp_path) - _files_under(sandbox)
    names = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as t:
            assert all(m.isreg() for m in t.getmembers())
            names += [m.name for m in t.getmembers()]
            t.extractall(sandbox, filter="fully_trusted")  # no protection: the names alone must be safe
    assert sorted(n.split(".")[0] for n in names) == ["dir/good1", "dir/good1", "good0", "good0"]
    assert _files_under(tmp_path) - _files_under(sandbox) == outside, "extraction wrote outside the sandbox"
    assert not [p for p in _files_under(sandbox) if p.is_symlink()]


@pytest.mark.parametrize("key", [*HOSTILE_KEYS, "..", ""])
def test_tar_writer_refuses_unsafe_member_names(key):
    """Every writer of sample tars (filter, cache build) goes through TarSink, which refuses such keys."""
    buf = io.BytesIO()
    with pytest.raises(UnsafeKeyError, match="refusing to write tar member"):
        TarSink(buf).write(key, {"jpg": b"x"})
    assert buf.getvalue() == b""
    with pytest.raises(UnsafeKeyError):
        TarSink(io.BytesIO()).write("fine", {"x/../../../y": b"x"})


def test_cache_build_refuses_a_hostile_key(tiny_dir, tmp_path):
    """A shard that skipped the filter: the cache build stops with one line naming the key, writes no tar."""
    from fusedit.components.cache.build import build_cache
    from tests.cache_helpers import tiny_recipe

    shard = tmp_path / "in" / "s.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as t:
        for key in ("fine", "../../escape"):
            for ext, data in (("image.jpg", jpeg((32, 32))), ("synthetic_caption.txt", CAPTION)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    out = tmp_path / "cache"
    with pytest.raises(UserError, match=r"refusing to write tar member '\.\./\.\./escape"):
        build_cache(str(shard), str(out), tiny_recipe("tiny", tiny_dir), dtype="fp32", device="cpu",
                    echo=lambda _line: None, progress=False)
    assert not list(tmp_path.rglob("escape*"))
    assert not list(out.rglob("*.tar"))


@pytest.mark.parametrize("name", ["../../evil", "/abs", "a/b", ".hidden", "nul\x00", ""])
def test_prompt_names_stay_file_names(tmp_path, name):
    """DPG/CLIP/FID prompt names become `<name>.png` under samples/: a name that leaves it is refused."""
    from fusedit.components.evaluate.evals.prompts import read_named_prompts

    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"id": name, "prompt": "a cat"}) + "\n")
    with pytest.raises(UserError, match="not a plain file name"):
        read_named_prompts(str(f), "--dpg-prompts")
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"id": "item-7", "prompt": "a cat"}) + "\n")
    assert read_named_prompts(str(ok), "--dpg-prompts") == [("item-7", "a cat")]


@pytest.mark.parametrize("name", ["..", ".", "..."])
def test_stage_names_cannot_name_a_parent(name):
    """A stage's outputs go to <output_root>/<stage>: '..' would be the parent of the root."""
    from pydantic import ValidationError

    from fusedit.components.train.config import TrainParams

    with pytest.raises(ValidationError, match="only dots"):
        TrainParams.model_validate({"stages": [{"name": name, "steps": 1}]})
    for bad in ("a/b", "/abs", "x\\y"):
        with pytest.raises(ValidationError):
            TrainParams.model_validate({"stages": [{"name": bad, "steps": 1}]})


def test_s3_pipeline_download_stays_in_its_directory(s3_server, tmp_path, monkeypatch):
    """An exported pipeline on S3 whose keys contain `..` cannot write outside the local download dir."""
    import boto3

    from fusedit.components.evaluate.run import local_pipeline
    from fusedit.components.shared import storage

    monkeypatch.setattr(storage, "_options", storage.S3Options())  # the endpoint from the env; restored after

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="pipes")
    s3.put_object(Bucket="pipes", Key="p/model_index.json", Body=b"{}")
    s3.put_object(Bucket="pipes", Key="p/../../../escaped.txt", Body=b"x")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="pipes", Prefix="p/")["Contents"]]
    assert "p/../../../escaped.txt" in keys, keys  # the server really stores the hostile key
    cache = tmp_path / "a" / "b" / "cache"
    with pytest.raises(UserError, match="outside"):
        local_pipeline("s3://pipes/p", cache)
    assert not list(tmp_path.rglob("escaped.txt"))
