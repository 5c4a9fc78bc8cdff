"""The report's examples: a bounded, seeded sample of kept samples and of every reject reason.

Each sample has a priority, a hash of (seed, key, index); the examples of a group are the group's
`k` samples of lowest priority (a bottom-k sample: uniform, reproducible, independent of shard order
and worker count). Pass 1 (one shard) keeps thumbnails of its own bottom-k per reason it rejected
after decoding, so the global bottom-k always finds its thumbnails. Kept samples and duplicates
(decided in pass 2) are thumbnailed in pass 2 from the per-shard work tar, duplicates beside the kept
sample they duplicate. Every example names its key, shard and the measured value that failed.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import io
from collections.abc import Callable
from typing import Any

from fusedit.components.data.checks import DECODE_REASONS
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.shared.tario import BLOCK, iter_samples

DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")
THUMB_SIDE = 128
MIN_SIDE = 48  # smaller images (a 1x1 reject) are blown up, pixelated, so they can be seen


def priority(seed: int, key: str | None, index: int | None) -> int:
    """The sample's rank in every seeded example draw (lower is drawn first)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def thumbnail(img: Any) -> str:
    """A small base64 JPEG of a PIL image (at most THUMB_SIDE pixels a side)."""
    from PIL import Image

    t = img.copy()
    t.thumbnail((THUMB_SIDE, THUMB_SIDE))
    if max(t.size) < MIN_SIDE:
        scale = MIN_SIDE / max(t.size)
        t = t.resize((max(1, round(t.width * scale)), max(1, round(t.height * scale))), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    t.convert("RGB").save(buf, "JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


class ShardPicker:
    """Pass 1: thumbnails of one shard's bottom-k rejected samples per reason (decoded ones only)."""

    def __init__(self, seed: int, k: int):
        self.seed, self.k = seed, k
        self._heaps: dict[str, list[tuple[int, int]]] = {}  # reason -> max-heap of (-priority, index)
        self.thumbs: dict[int, str] = {}

    def offer(self, reason: str, key: str, index: int, image: Callable[[], Any]) -> None:
        if self.k <= 0:
            return
        p = priority(self.seed, key, index)
        heap = self._heaps.setdefault(reason, [])
        if len(heap) < self.k:
            heapq.heappush(heap, (-p, index))
        elif -heap[0][0] > p:
            _, evicted = heapq.heapreplace(heap, (-p, index))
            del self.thumbs[evicted]
        else:
            return
        self.thumbs[index] = thumbnail(image())


def bottom_k(rows: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """The k rows of lowest priority, returned in input order."""
    ranked = sorted(range(len(rows)), key=lambda i: priority(seed, rows[i]["key"], rows[i]["index"]))
    return [rows[i] for i in sorted(ranked[:k])]


def tile_text(reason: str) -> str:
    """What stands in for a picture when a rejected sample has none."""
    if reason == "missing_image":
        return "no image"
    if reason in DECODE_REASONS:
        return "cannot decode"
    return "not decoded"


def image_reader(kept_tars: dict[str, str], max_member_bytes: int) -> Callable[[dict[str, Any]], str | None]:
    """row -> thumbnail of its image, read back from the pass-1 work tar of its shard (kept rows only)."""
    from PIL import Image

    def read(row: dict[str, Any]) -> str | None:
        path = kept_tars.get(row["shard"])
        if path is None or row.get("tar_offset") is None:
            return None
        with open(path, "rb") as f:
            f.seek(row["tar_offset"])
            blob = f.read(row["tar_length"])
        for sample in iter_samples(io.BytesIO(blob + bytes(2 * BLOCK)), max_member_bytes):
            data = sample.members.get("image.jpg")
            if data:
                return thumbnail(Image.open(io.BytesIO(data)))
        return None

    return read


def _entry(row: dict[str, Any], thumb: str | None) -> dict[str, Any]:
    return {"key": row["key"], "shard": row["shard"], "index": row["index"], "thumb": thumb}


def _size(row: dict[str, Any]) -> str:
    return f"{row['width']}x{row['height']}" if row.get("width") is not None else ""


def pick_examples(rows: list[dict[str, Any]], originals: dict[int, int], thumbs: dict[tuple[str, int], str],
                  cfg: FilterConfig, read: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
    """{"kept": [...], "rejected": {reason: [...]}}: each example with key, shard, index, thumb (or a tile
    text), the measured value (`detail`) and, for a duplicate, the kept `original` (rows[originals[i]])."""
    seed, k = cfg.example_seed, cfg.examples_per_reason
    kept = [r for r in rows if r["decision"] == "kept"]
    out_kept = [{**_entry(r, read(r)), "detail": _size(r)} for r in bottom_k(kept, cfg.thumbnails, seed)]
    by_reason: dict[str, list[dict[str, Any]]] = {}
    position = {}
    for i, r in enumerate(rows):
        if r["decision"] == "rejected" and r["reason"]:
            by_reason.setdefault(r["reason"], []).append(r)
            position[id(r)] = i
    rejected: dict[str, list[dict[str, Any]]] = {}
    for reason, group in by_reason.items():
        rejected[reason] = []
        for r in bottom_k(group, k, seed):
            duplicate = reason in DUPLICATE_REASONS
            thumb = read(r) if duplicate else thumbs.get((r["shard"], r["index"]))
            ex = {**_entry(r, thumb), "reason": reason, "detail": r["detail"], "size": _size(r),
                  "tile": None if thumb else tile_text(reason), "original": None}
            j = originals.get(position[id(r)])
            if j is not None:
                ex["original"] = {**_entry(rows[j], read(rows[j])), "size": _size(rows[j])}
            rejected[reason].append(ex)
    return {"kept": out_kept, "rejected": rejected}
