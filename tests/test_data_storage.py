"""Local storage, patterns, atomic writes and the strict tar reader."""
from __future__ import annotations

import tarfile

import pytest

from fusedit.components.shared import patterns, storage
from fusedit.components.shared.tario import ShardError, TarSink, iter_samples
from tests.data_helpers import jpeg, member_ends, write_tar


def test_brace_expansion_keeps_padding_and_lists():
    assert patterns.expand_braces("s-{0008..0011}.tar") == ["s-0008.tar", "s-0009.tar", "s-0010.tar", "s-0011.tar"]
    assert patterns.expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]
    assert patterns.expand_braces("s3://b/p/shard-{00..01}.tar") == ["s3://b/p/shard-00.tar", "s3://b/p/shard-01.tar"]


def test_expand_directories_globs_and_several_patterns(tmp_path):
    for n in ("a-0.tar", "a-1.tar", "b-0.tar", "notes.json"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / ".work").mkdir()
    (tmp_path / ".work" / "kept.tar").write_bytes(b"x")
    assert [p.rsplit("/", 1)[1] for p in storage.expand(str(tmp_path))] == ["a-0.tar", "a-1.tar", "b-0.tar"]
    assert storage.expand(f"{tmp_path}/a-*.tar") == [f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar"]
    both = storage.expand(f"{tmp_path}/b-0.tar {tmp_path}/a-{{0..1}}.tar {tmp_path}/b-0.tar")
    assert both == [f"{tmp_path}/b-0.tar", f"{tmp_path}/a-0.tar", f"{tmp_path}/a-1.tar"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    storage.write_bytes(str(target), b"whole")
    assert target.read_bytes() == b"whole" and oct(target.stat().st_mode & 0o777) != "0o600"


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(storage.StorageError, match="nope.tar: not found"):
        storage.open_read(str(tmp_path / "nope.tar"))


def test_reader_groups_members_and_flags_duplicate_keys(tmp_path):
    p = write_tar(tmp_path / "s.tar", [
        ("a", {"jpg": jpeg(), "txt": b"one"}),
        ("b", {"jpg": jpeg(), "txt": b"two"}),
        ("a", {"jpg": jpeg(), "txt": b"again"}),  # same key later in the shard
    ])
    with open(p, "rb") as f:
        got = [(s.key, s.index, sorted(s.members), s.duplicate_key) for s in iter_samples(f)]
    assert got == [("a", 0, ["jpg", "txt"], False), ("b", 1, ["jpg", "txt"], False),
                   ("a", 2, ["jpg", "txt"], True)]


def test_reader_handles_long_names_written_by_tarfile(tmp_path):
    key = "dir/" + "k" * 150
    p = write_tar(tmp_path / "long.tar", [(key, {"txt": b"hi"})])
    with open(p, "rb") as f:
        (s,) = list(iter_samples(f))
    assert s.key == key and s.members == {"txt": b"hi"}


@pytest.mark.parametrize("cut", ["member_boundary", "mid_member", "mid_header"])
def test_truncated_tar_is_always_reported(tmp_path, cut):
    p = write_tar(tmp_path / "s.tar", [(f"k{i}", {"jpg": jpeg(), "txt": b"c"}) for i in range(4)])
    ends = member_ends(p)
    at = {"member_boundary": ends[4], "mid_member": ends[4] + 700, "mid_header": ends[4] + 100}[cut]
    data = p.read_bytes()[:at]
    # python's tarfile silently stops at a cut member boundary: the loss would go unnoticed
    if cut == "member_boundary":
        (tmp_path / "cut.tar").write_bytes(data)
        with tarfile.open(tmp_path / "cut.tar") as t:
            assert len(t.getmembers()) == 5
    (tmp_path / "cut.tar").write_bytes(data)
    seen = []
    with open(tmp_path / "cut.tar", "rb") as f, pytest.raises(ShardError, match="truncated") as err:
        for s in iter_samples(f):
            seen.append(s.key)
    assert seen == ["k0", "k1"]  # whole samples before the cut
    assert err.value.partial.key == "k2"  # the sample in progress is handed over, not dropped


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"hello, not a tar" * 100, "not a tar")])
def test_non_tar_files_are_reported(tmp_path, content, match):
    (tmp_path / "x.tar").write_bytes(content)
    with open(tmp_path / "x.tar", "rb") as f, pytest.raises(ShardError, match=match):
        list(iter_samples(f))


def test_oversized_members_are_skipped_but_flagged(tmp_path):
    p = write_tar(tmp_path / "s.tar", [("a", {"jpg": b"x" * 5000, "txt": b"t"}), ("b", {"txt": b"u"})])
    with open(p, "rb") as f:
        a, b = list(iter_samples(f, max_member_bytes=1000))
    assert a.oversized == ["jpg"] and a.members == {"txt": b"t"} and b.key == "b"


def test_tar_sink_output_is_a_standard_tar(tmp_path):
    with open(tmp_path / "o.tar", "wb") as f:
        sink = TarSink(f)
        sink.write("x1", {"image.jpg": b"abc", "caption.txt": b"hello"})
        sink.write("y" * 120, {"txt": b"long name"})
        sink.close()
    with tarfile.open(tmp_path / "o.tar") as t:
        assert [(m.name, m.size) for m in t.getmembers()] == [
            ("x1.caption.txt", 5), ("x1.image.jpg", 3), ("y" * 120 + ".txt", 9)]
