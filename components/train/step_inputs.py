"""The host side of each training step: the batch, its random draws, and the copy to the device.

Every draw of step s (caption dropout, timesteps, posterior and flow noise) comes from that step's own
generator, so making the inputs early, or on another thread (`Prefetch`, for reads that stall), changes
no number. On a GPU the batch is pinned and copied without blocking the host.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from fusedit.components.cache.reader import Batch, sample_x0
from fusedit.model.text import TextContext


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one global step: caption dropout, timesteps, posterior and flow noise."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> 1))


@dataclass
class StepInputs:
    """This rank's share of one global step, ready for `RectifiedFlow.loss`."""

    step: int
    x0: torch.Tensor  # scaled latents (or pixels)
    sigmas: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor  # caption dropped (bool)
    captions: list[str]  # the captions trained on: "" where dropped
    text: TextContext | None  # cached text features; None when the LLM runs in the step

    def pin(self) -> StepInputs:
        """Page-locked host memory, so the copy to the GPU runs without blocking the host."""
        return self._map(lambda x: x.pin_memory() if x.device.type == "cpu" else x)

    def to(self, device: torch.device) -> StepInputs:
        return self._map(lambda x: x.to(device, non_blocking=True))

    def _map(self, fn) -> StepInputs:
        text = None if self.text is None else self.text.map(lambda x, _dim: fn(x), fn, keeps_valid=True)
        return replace(self, x0=fn(self.x0), sigmas=fn(self.sigmas), noise=fn(self.noise), drop=fn(self.drop),
                       text=text)

    def text_or_captions(self, uncond: TextContext | None) -> TextContext | list[str]:
        """Cached features with dropped captions swapped for the empty caption's; else the captions."""
        return self.captions if self.text is None else self.text.where(self.drop, uncond)


def make_inputs(batches: Iterator[Batch], start: int, global_batch: int, offset: int, seed: int, flow,
                dropout: float, shift: float, scale: float, cached_text: bool = True) -> Iterator[StepInputs]:
    """The inputs of steps start, start+1, ...: the global step's draws, sliced to this rank's samples.

    Without `cached_text` (the LLM runs in the step, e.g. it trains) the captions are the text input.

    `offset` is where this rank's samples start in the global batch; a batch shorter than the rank's
    share (an unreadable sample was skipped) takes the first draws of its slice.
    """
    step = start
    for batch in batches:
        g = step_generator(seed, step)
        shape = (global_batch, *batch.mean.shape[1:])
        mine = slice(offset, offset + len(batch.mean))
        drop = (torch.rand(global_batch, generator=g) < dropout)[mine]
        sigmas = flow.sample_sigmas(global_batch, g)[mine]
        post = torch.randn(shape, generator=g)[mine].to(batch.mean.device)
        noise = torch.randn(shape, generator=g)[mine]
        x0 = sample_x0(batch.mean, batch.logvar, shift, scale, noise=post)
        captions = ["" if dropped else c for dropped, c in zip(drop.tolist(), batch.captions, strict=True)]
        yield StepInputs(step, x0, sigmas, noise, drop, captions, batch.text if cached_text else None)
        step += 1


class Prefetch:
    """Runs an iterator `depth` items ahead in a daemon thread; its errors surface at the item they hit.

    Depth 0 makes each item when it is asked for, on the caller's thread."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2, prepare: Callable | None = None):
        self._items, self._prepare = items, prepare or (lambda x: x)
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._fill, name="step-inputs", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, self._prepare(item))):
                    return
            self._put((True, self._END))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer, at the step it belongs to
            self._put((False, exc))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return self._prepare(next(self._items))
        ok, item = self._queue.get()
        if not ok:
            raise item
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue or inside a read; it is a daemon either way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
