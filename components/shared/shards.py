"""A set of sample shards as every step reads it: which shards, their samples, a sample's caption and image.

A filter output lists its shards in its manifest; anything else is a pattern, directory or S3 prefix.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from fusedit.components.shared import storage
from fusedit.components.shared.tario import Sample, ShardError, iter_samples
from fusedit.errors import UserError

IMAGE_MEMBERS = ("image.jpg", "jpg", "jpeg", "png", "webp")


def input_shards(uri: str) -> list[str]:
    """Shards of a filter output (its manifest lists them) or of any pattern/directory/prefix."""
    manifest = storage.join(uri, "manifest.json")
    if (storage.is_s3(uri) or os.path.isdir(uri)) and storage.exists(manifest):
        shards = storage.read_json(manifest).get("result", {}).get("shards")
        if shards is not None:
            return [s if storage.is_s3(s) or os.path.isabs(s) or storage.is_s3(uri)
                    else storage.join(uri, "shards", os.path.basename(s)) for s in shards]
    if storage.is_s3(uri) and not uri.endswith((".tar", "/")):
        uri += "/"
    return storage.expand(uri)


def read_samples(uri: str, max_member_bytes: int = 64 << 20) -> Iterator[Sample]:
    """Samples of one shard; a broken shard is a user error naming it."""
    try:
        with storage.open_read(uri) as f:
            yield from iter_samples(f, max_member_bytes)
    except ShardError as exc:
        raise UserError(f"{uri}: shard {exc}") from None


def count_samples(uri: str) -> int:
    """Samples in a shard, from the tar headers only (member data is skipped, not kept)."""
    return sum(1 for _ in read_samples(uri, max_member_bytes=0))


def caption_of(sample: Sample, uri: str, caption: str) -> str:
    data = sample.members.get(f"{caption}.txt")
    if data is None:
        raise UserError(f"{uri}: sample '{sample.key}' (#{sample.index}) has no caption member "
                        f"'{caption}.txt' (was the input filtered with `fusedit data filter`?)")
    return data.decode("utf-8")


def image_member(members: dict[str, bytes]) -> bytes | None:
    """A sample's image bytes (the first image member it has), or None."""
    return next((members[m] for m in IMAGE_MEMBERS if m in members), None)
