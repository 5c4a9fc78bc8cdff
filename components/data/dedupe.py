"""Duplicate detection across the whole input, after the parallel per-shard pass.

Exact duplicates share a hash of the encoded image bytes; near duplicates have 64-bit perceptual
hashes within `threshold` bits. Near search uses the pigeonhole trick (split the hash into
threshold+1 bands: two hashes that close agree on at least one band), so it stays near-linear.
The first occurrence in input order is kept; later ones point to it with `duplicate_of`.
"""
from __future__ import annotations

from collections import defaultdict
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
        self._exact: dict[str, Any] = {}
        self._bands: dict[tuple[int, int], list[tuple[int, tuple[int, Any]]]] = defaultdict(list)
        self._n = 0  # remembered hashes so far (identifies an entry across bands)

    def check(self, ref: Any, exact_hash: str | None, phash_hex: str | None) -> tuple[str, Any, int] | None:
        """(reason, original's ref, hash distance) if this sample duplicates a kept one; else remember it."""
        if self.exact and exact_hash is not None:
            if exact_hash in self._exact:
                return "exact_duplicate", self._exact[exact_hash], 0
        h = int(phash_hex, 16) if phash_hex else None
        if self.near and h is not None:
            best: tuple[int, Any] | None = None
            seen: set[int] = set()
            for band in _bands(h, self.threshold + 1):
                for n, (other_h, other_ref) in self._bands.get(band, ()):
                    if n in seen:
                        continue
                    seen.add(n)
                    d = (h ^ other_h).bit_count()
                    if d <= self.threshold and (best is None or d < best[0]):
                        best = (d, other_ref)
            if best is not None:
                return "near_duplicate", best[1], best[0]
        if exact_hash is not None:
            self._exact.setdefault(exact_hash, ref)
        if h is not None:
            n = self._n
            self._n += 1
            for band in _bands(h, self.threshold + 1):
                self._bands[band].append((n, (h, ref)))
        return None


def mark_duplicates(rows: list[dict[str, Any]], exact: bool, near: bool, threshold: int) -> dict[int, int]:
    """Mark kept rows (in order) that duplicate an earlier kept row; returns {duplicate: original} positions.

    The detail names the original and the measured distance (0 for the same bytes).
    """
    dd = Deduper(exact, near, threshold)
    marked: dict[int, int] = {}
    for i, row in enumerate(rows):
        if row["decision"] != "kept":
            continue
        hit = dd.check(i, row["exact_hash"], row["phash"])
        if hit is not None:
            reason, j, distance = hit
            original = rows[j]["key"]
            detail = (f"same bytes as {original}" if reason == "exact_duplicate" else
                      f"looks like {original}: perceptual-hash distance {distance} <= {threshold}")
            row.update(decision="rejected", reason=reason, duplicate_of=original, detail=detail)
            marked[i] = j
    return marked
