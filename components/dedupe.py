"""Duplicate detection across the whole input, after the parallel per-shard pass.

Exact duplicates share a hash of the encoded image bytes; near duplicates have 64-bit perceptual
hashes within `threshold` bits. Near search uses the pigeonhole trick (split the hash into
threshold+1 bands: two hashes that close agree on at least one band), so it stays near-linear.
The first occurrence in input order is kept; later ones point to it with `duplicate_of`.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any


def _bands(h: int, n_bands: int) -> list[tuple[int, int]]:
    out, start = [], 0
    for b in range(n_bands):
        width = (64 - start) // (n_bands - b)
        out.append((b, (h >> start) & ((1 << width) - 1)))
        start += width
    return out


class Deduper:
    def __init__(self, exact: bool = True, near: bool = True, threshold: int = 4):
        self.exact, self.near, self.threshold = exact, near, threshold
        self._exact: dict[str, str] = {}
        self._bands: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)

    def check(self, key: str, exact_hash: str | None, phash_hex: str | None) -> tuple[str, str] | None:
        """(reason, original key) if this sample duplicates a kept one; otherwise remember it."""
        if self.exact and exact_hash is not None:
            if exact_hash in self._exact:
                return "exact_duplicate", self._exact[exact_hash]
        h = int(phash_hex, 16) if phash_hex else None
        if self.near and h is not None:
            best: tuple[int, str] | None = None
            seen: set[str] = set()
            for band in _bands(h, self.threshold + 1):
                for other_h, other_key in self._bands.get(band, ()):
                    if other_key in seen:
                        continue
                    seen.add(other_key)
                    d = (h ^ other_h).bit_count()
                    if d <= self.threshold and (best is None or d < best[0]):
                        best = (d, other_key)
            if best is not None:
                return "near_duplicate", best[1]
        if exact_hash is not None:
            self._exact.setdefault(exact_hash, key)
        if h is not None:
            for band in _bands(h, self.threshold + 1):
                self._bands[band].append((h, key))
        return None


def mark_duplicates(rows: Iterable[dict[str, Any]], exact: bool, near: bool, threshold: int) -> int:
    """Mark kept rows (in order) that duplicate an earlier kept row; returns how many were marked."""
    dd = Deduper(exact, near, threshold)
    marked = 0
    for row in rows:
        if row["decision"] != "kept":
            continue
        hit = dd.check(row["key"], row["exact_hash"], row["phash"])
        if hit is not None:
            reason, original = hit
            row.update(decision="rejected", reason=reason, duplicate_of=original,
                       detail=f"{'same bytes as' if reason == 'exact_duplicate' else 'looks like'} {original}")
            marked += 1
    return marked
