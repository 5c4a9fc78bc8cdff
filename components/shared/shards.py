"""A set of sample shards as every step reads it: which shards, their samples, a sample's caption and image.

A filter output lists its shards in its manifest; anything else is a pattern, directory or S3 prefix.
Its manifest also records how many samples each shard holds (`counts`), so `shard_counts` reads
those instead of streaming the shards.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

from fusedit.components.shared import storage
from fusedit.components.shared.tario import Sample, ShardError, iter_samples
from fusedit.errors import UserError

IMAGE_MEMBERS = ("image.jpg", "jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"  # a filter output's manifest, next to its shards/ folder


def input_shards(uri: str) -> list[str]:
    """Shards of a filter output (its manifest lists them) or of any pattern/directory/prefix."""
    manifest = storage.join(uri, MANIFEST)
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


def _output_of(uri: str) -> tuple[str, str] | None:
    """(the output root, the shard's path relative to it) for a shard in a `<root>/shards/` folder, else None."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        folder, _, name = key.rpartition("/")
        root_key, _, sub = folder.rpartition("/")
        root = f"s3://{bucket}/{root_key}" if root_key else f"s3://{bucket}"
    else:
        folder, name = os.path.split(uri)
        root, sub = os.path.split(folder)
    return (root, f"shards/{name}") if sub == "shards" and name else None


def shard_counts(uris: list[str]) -> list[int]:
    """Samples in each shard: from the `counts` of the manifest next to its `shards/` folder (a filter
    output's), else counted (`count_samples`) for every shard that no manifest covers."""
    manifests: dict[str, dict] = {}
    out = []
    for uri in uris:
        n = None
        where = _output_of(uri)
        if where is not None:
            root, rel = where
            if root not in manifests:
                path = storage.join(root, MANIFEST)
                manifests[root] = (storage.read_json(path) or {}) if storage.exists(path) else {}
            counts = manifests[root].get("counts") if isinstance(manifests[root], dict) else None
            n = counts.get(rel) if isinstance(counts, dict) else None
        out.append(n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else count_samples(uri))
    return out


def caption_of(sample: Sample, uri: str, caption: str) -> str:
    data = sample.members.get(f"{caption}.txt")
    if data is None:
        raise UserError(f"{uri}: sample '{sample.key}' (#{sample.index}) has no caption member "
                        f"'{caption}.txt' (was the input filtered with `fusedit data filter`?)")
    return data.decode("utf-8")


def image_member(members: dict[str, bytes]) -> bytes | None:
    """A sample's image bytes (the first image member it has), or None."""
    return next((members[m] for m in IMAGE_MEMBERS if m in members), None)
