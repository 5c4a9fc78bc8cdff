"""A strict streaming tar reader that groups WebDataset members into samples.

Python's `tarfile` ends quietly at a cut-off header or garbage after a member, which would lose the
rest of a shard without a word; this reader insists on the end-of-archive block and checksums, so
a truncated tar or a non-tar file is always reported (`ShardError`) instead of silently shortened.
Memory is one member at a time; members larger than `max_member_bytes` are skipped and flagged.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from fusedit.errors import UserError

BLOCK = 512
_ZERO = bytes(BLOCK)


class ShardError(Exception):
    """The shard is not a tar archive or ends early; `samples_read` members groups came before."""


@dataclass
class Sample:
    key: str
    index: int  # position of the sample in its shard
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    oversized: list[str] = field(default_factory=list)  # extensions skipped for size
    duplicate_key: bool = False  # key already seen earlier in this shard


def _read(stream: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = stream.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _skip(stream: BinaryIO, n: int) -> int:
    left = n
    while left:
        b = stream.read(min(left, 1 << 20))
        if not b:
            break
        left -= len(b)
    return n - left


def _octal(field_: bytes) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256 for big sizes
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = field_.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _size(hdr: bytes, offset: int) -> int:
    try:
        return _octal(hdr[124:136])
    except ValueError:
        raise ShardError(f"has a corrupt size field in the header at byte {offset}") from None


def _checksum_ok(hdr: bytes) -> bool:
    try:
        stored = _octal(hdr[148:156])
    except ValueError:
        return False
    blanked = hdr[:148] + b" " * 8 + hdr[156:]
    unsigned = sum(blanked)
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(b > 127 for b in blanked)  # old signed-sum writers


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax header ("<len> <key>=<value>\\n" records); ShardError when malformed."""
    path = None
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp]) if sp > pos else 0
        except ValueError:
            length = 0
        if length <= sp - pos or pos + length > len(data):  # also guards against a zero length looping forever
            raise ShardError(f"has a malformed pax header record at offset {pos} of the header")
        rec = data[sp + 1: pos + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            path = v.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # a name ends at NUL, as in headers
        pos += length
    return path


def iter_members(stream: BinaryIO, max_member_bytes: int) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) for each regular file; data is None when the member exceeds the size limit."""
    offset = 0
    next_name: str | None = None
    while True:
        hdr = _read(stream, BLOCK)
        if not hdr:
            raise ShardError("ends without the end-of-archive block (truncated)"
                             if offset else "is empty, not a tar archive")
        if len(hdr) < BLOCK:
            raise ShardError(f"ends inside a header at byte {offset} (truncated)")
        if hdr == _ZERO:
            return
        if not _checksum_ok(hdr):
            raise ShardError("is not a tar archive (bad header at byte 0)" if offset == 0
                             else f"has a corrupt header at byte {offset}")
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}" if prefix else name
        size = _size(hdr, offset)
        kind = hdr[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        offset += BLOCK
        regular = kind in (b"0", b"\0", b"7")
        if kind in (b"x", b"L") and size > max_member_bytes:  # a name header this big is not a name
            raise ShardError(f"has an oversized ({size} bytes) name header at byte {offset - BLOCK}")
        if not regular and kind not in (b"x", b"L"):  # links, devices, directories: skipped, never read
            if _skip(stream, padded) < padded:
                raise ShardError(f"ends inside member {name!r} (truncated)")
            offset += padded
            next_name = None
            continue
        if regular and size > max_member_bytes:
            if _skip(stream, padded) < padded:
                raise ShardError(f"ends inside member {name!r} (truncated)")
            offset += padded
            yield (next_name or name), None
            next_name = None
            continue
        data = _read(stream, padded)
        if len(data) < padded:
            raise ShardError(f"ends inside member {next_name or name!r} (truncated)")
        offset += padded
        data = data[:size]
        if kind == b"x":
            next_name = _pax_path(data) or next_name
        elif kind == b"L":
            next_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        else:
            yield (next_name or name), data
            next_name = None


def unsafe_key(key: str) -> str | None:
    """Why a sample key must not become a path (a member name of a tar we write), or None when it may.

    A key is a path fragment to whoever extracts our shards: an absolute key, a `..` component, a
    backslash (a separator on Windows) or a control character could write outside their directory.
    """
    if not key:
        return "the key is empty"
    if key.startswith("/"):
        return "the key is an absolute path"
    if ".." in key.split("/"):
        return "the key has a '..' component"
    if "\\" in key:
        return "the key has a backslash"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in key):
        return "the key has control characters or bytes that are not UTF-8"
    return None


class UnsafeKeyError(UserError):
    """A sample key that would escape the directory of whoever extracts the tar (see `unsafe_key`)."""


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename; the rest is the field."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def iter_samples(stream: BinaryIO, max_member_bytes: int = 64 << 20) -> Iterator[Sample]:
    """Group consecutive members by key into samples.

    A repeated field within one group starts a new sample with the same key; any key seen before in
    the shard is flagged `duplicate_key`. On a ShardError the partial sample (if any) is attached to
    the exception as `.partial` before it propagates.
    """
    seen: set[str] = set()
    current: Sample | None = None
    index = 0
    try:
        for name, data in iter_members(stream, max_member_bytes):
            key, ext = split_name(name)
            if current is not None and (key != current.key or ext in current.members
                                        or ext in current.oversized):
                yield current
                current = None
            if current is None:
                current = Sample(key=key, index=index, duplicate_key=key in seen)
                seen.add(key)
                index += 1
            if data is None:
                current.oversized.append(ext)
            else:
                current.members[ext] = data
    except ShardError as exc:
        exc.partial = current  # type: ignore[attr-defined]
        exc.samples_read = index - (1 if current is not None else 0)  # type: ignore[attr-defined]
        raise
    if current is not None:
        yield current


def _header(name: bytes, size: int, kind: bytes = b"0") -> bytes:
    hdr = bytearray(BLOCK)
    hdr[0:len(name)] = name
    hdr[100:108] = b"0000444\0"
    hdr[108:116] = hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"00000000000\0"  # mtime 0: reproducible archives
    hdr[148:156] = b" " * 8
    hdr[156:157] = kind
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _member(name: str, data: bytes) -> bytes:
    raw = name.encode("utf-8")
    pax = b""
    if len(raw) > 100:
        rec = b" path=" + raw + b"\n"
        n = len(rec)
        n += len(str(n + len(str(n))))
        body = str(n).encode() + rec
        pax = _header(b"././@PaxHeader", len(body), b"x") + body + bytes(-len(body) % BLOCK)
        raw = raw[-100:]
    return b"".join((pax, _header(raw, len(data)), data, bytes(-len(data) % BLOCK)))


class TarSink:
    """Writes WebDataset samples as a plain ustar tar (long names via a pax header); ~10x cheaper
    per member than `tarfile`. `write` returns the sample's byte range, so a later pass can copy
    whole samples between tars without parsing them again (`copy_raw`)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.offset = 0

    def _put(self, blob: bytes) -> tuple[int, int]:
        self.f.write(blob)
        start = self.offset
        self.offset += len(blob)
        return start, len(blob)

    def write(self, key: str, members: dict[str, bytes]) -> tuple[int, int]:
        """Append one sample; refuses keys and fields that are not safe relative paths."""
        for name in (key, *(f"{key}.{ext}" for ext in members)):
            if why := unsafe_key(name):
                raise UnsafeKeyError(f"refusing to write tar member {name!r}: {why}")
        return self._put(b"".join(_member(f"{key}.{ext}", members[ext]) for ext in sorted(members)))

    def copy_raw(self, blob: bytes) -> tuple[int, int]:
        """Append the exact bytes of whole samples taken from another tar written by TarSink."""
        return self._put(blob)

    def close(self) -> None:
        self.f.write(bytes(2 * BLOCK))  # end-of-archive marker
