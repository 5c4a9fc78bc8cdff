"""Which sample each rank trains on at each step: a pure function of (seed, step, rank, world, counts).

The sample stream is an endless sequence of epochs; each epoch visits the shards in a seeded order
and each shard's samples in a seeded order. Global batch s covers stream positions
[s*B*W, (s+1)*B*W) and rank r takes the r-th slice of B. Because any position maps to
(shard, index) by arithmetic over the per-shard counts, resuming at step s decodes nothing before it.
"""
from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np

from fusedit.errors import UserError


class SampleOrder:
    def __init__(self, counts: list[int], seed: int, batch_size: int, rank: int = 0, world: int = 1):
        if seed < 0:
            raise UserError(f"seed must be >= 0 (got {seed})")
        if batch_size < 1 or world < 1 or not 0 <= rank < world:
            raise UserError(f"bad batch/rank layout: batch_size={batch_size}, rank={rank}, world={world}")
        self.counts, self.total = list(counts), sum(counts)
        if self.total == 0:
            raise UserError("the data holds no samples")
        self.seed, self.batch_size, self.rank, self.world = seed, batch_size, rank, world

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, freed with the object
    def _epoch(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        starts = np.cumsum([0] + [self.counts[i] for i in shards]).tolist()
        return shards, starts

    @lru_cache(maxsize=8)  # noqa: B019
    def _within(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard, 1]).permutation(self.counts[shard])

    def locate(self, pos: int) -> tuple[int, int]:
        """Stream position -> (shard number, sample index inside that shard)."""
        epoch, off = divmod(pos, self.total)
        shards, starts = self._epoch(epoch)
        j = bisect.bisect_right(starts, off) - 1
        shard = int(shards[j])
        return shard, int(self._within(epoch, shard)[off - starts[j]])

    def step(self, step: int) -> list[tuple[int, int]]:
        """This rank's (shard, index) pairs for one training step."""
        first = (step * self.world + self.rank) * self.batch_size
        return [self.locate(p) for p in range(first, first + self.batch_size)]
