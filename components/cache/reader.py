"""What the trainer reads each step: cached features or features computed online, behind one interface.

Both paths visit samples in the same order (`order.SampleOrder`), so a run can switch between them
and `batches(start_step)` resumes exactly where an uninterrupted run would be. Only the shard that
holds the current samples is kept in memory (raw bytes; only the samples this rank uses are decoded).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from fusedit.components.cache.format import (
    FEATURES_EXT,
    META_EXT,
    as_recipe,
    check_feature_identity,
    read_manifest,
    text_from_tensors,
)
from fusedit.components.cache.frozen import ImageEncoder, preprocess, sample_x0, to_unit
from fusedit.components.cache.order import SampleOrder
from fusedit.components.shared import storage
from fusedit.components.shared.device import pick_device
from fusedit.components.shared.shards import caption_of, image_member, input_shards, read_samples, shard_counts
from fusedit.components.shared.tario import Sample
from fusedit.errors import UserError
from fusedit.model.config import Recipe
from fusedit.model.text import TextContext

__all__ = ["Batch", "Features", "check_feature_identity", "open_features", "sample_x0"]
log = logging.getLogger(__name__)


@dataclass
class Batch:
    keys: list[str]
    captions: list[str]  # the caption trained on (the synthetic caption)
    mean: torch.Tensor  # (B, C, H, W) raw VAE posterior mean, or pixels in [-1, 1] in pixel space
    logvar: torch.Tensor | None  # (B, C, H, W); None in pixel space
    text: TextContext | None  # cached text features padded within the batch; None online


class Features(Protocol):
    uncond: TextContext | None  # cached empty-caption features (None online)
    bad: BadSamples  # samples skipped because they no longer read back
    latent_shift: float  # x0 = (sample - shift) * scale; (0, 1) in pixel space
    latent_scale: float

    def batches(self, start_step: int = 0) -> Iterator[Batch]: ...


class BadSamples:
    """Samples that no longer read back (a shard changed, cut off or corrupted after it was counted):
    each is skipped, logged and counted once; more than `max_rate` of the data set is an error."""

    def __init__(self, total: int, max_rate: float):
        self.total, self.max_rate = total, max_rate
        self.seen: dict[tuple[str, int], str] = {}

    @property
    def count(self) -> int:
        return len(self.seen)

    def skip(self, uri: str, index: int, why: str) -> None:
        if (uri, index) in self.seen:
            return
        why = why.removeprefix(f"{uri}: ")
        self.seen[(uri, index)] = why
        log.warning("%s: sample #%d skipped: %s", uri, index, why)
        if self.count > self.max_rate * self.total:
            raise UserError(f"{self.count} of {self.total} samples are unreadable, more than max_bad_sample_rate "
                            f"{self.max_rate:g}; last: {uri} sample #{index}: {why}")


class _ShardBuffer:
    """The raw samples of the one shard in use; the stream never returns to a shard within an epoch.

    A shard that cannot be read to its end keeps the samples before the damage; the rest are missing.
    """

    def __init__(self, uris: list[str]):
        self.uris, self.current, self.samples, self.error = uris, -1, {}, ""

    def get(self, shard: int, index: int) -> Sample | str:
        """The sample, or why it is not there."""
        if shard != self.current:
            self.samples, self.current, self.error = {}, -1, "not in the shard (it has fewer samples now)"
            try:
                for s in read_samples(self.uris[shard]):
                    self.samples[s.index] = s
            except UserError as exc:  # cut off, corrupt or gone since it was counted
                self.error = str(exc)
            self.current = shard
        return self.samples.get(index, self.error)


class _Source:
    def __init__(self, uris: list[str], counts: list[int], batch_size: int, seed: int, rank: int, world: int,
                 max_bad_rate: float = 0.01):
        self.uris = uris
        self.order = SampleOrder(counts, seed, batch_size, rank, world)
        self.bad = BadSamples(sum(counts), max_bad_rate)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """The batch of each step from `start_step` on; unreadable samples are left out (see BadSamples)."""
        if start_step < 0:
            raise UserError(f"start_step must be >= 0 (got {start_step})")
        buf = _ShardBuffer(self.uris)
        step = start_step
        while True:
            items = []
            for s, i in self.order.step(step):
                sample = buf.get(s, i)
                try:
                    if isinstance(sample, str):
                        raise ValueError(sample)
                    items.append(self._decode(sample, self.uris[s]))
                except Exception as exc:  # noqa: BLE001 - any unreadable sample is skipped and counted
                    self.bad.skip(self.uris[s], i, str(exc) if isinstance(exc, ValueError | UserError)
                                  else f"{type(exc).__name__}: {exc}")
            if not items:
                raise UserError(f"every sample of step {step} is unreadable (see the warnings above)")
            yield self._collate(items)
            step += 1

    def _decode(self, sample: Sample, uri: str):
        raise NotImplementedError

    def _collate(self, items: list) -> Batch:
        raise NotImplementedError


class CachedFeatures(_Source):
    """Reads `fusedit cache build` output: no LLM and no VAE in memory. Batches are in host memory: the
    trainer pins each one and copies it to its device without blocking the host."""

    def __init__(self, uri: str, manifest: dict, batch_size: int, seed: int, rank: int, world: int,
                 max_bad_rate: float = 0.01, text: bool = True):
        from safetensors.torch import load

        self.text = text  # False: the stage computes its text online; the cached K/V are never decoded

        shards = manifest["shards"]
        super().__init__([storage.join(uri, s["name"]) for s in shards], [s["n"] for s in shards],
                         batch_size, seed, rank, world, max_bad_rate)
        self.uncond = text_from_tensors([load(storage.read_bytes(storage.join(uri, manifest["uncond"])))])
        self.latent_shift, self.latent_scale = float(manifest["latent_shift"]), float(manifest["latent_scale"])

    def _decode(self, sample: Sample, uri: str) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load

        data = sample.members[FEATURES_EXT]
        feats = load(data if self.text else image_tensors(data))
        meta = json.loads(sample.members[META_EXT])
        if not ({"pixels"} <= feats.keys() or {"mean", "logvar"} <= feats.keys()) or "caption" not in meta:
            raise ValueError(f"sample '{sample.key}' lacks image features or its caption")
        return feats, meta

    def _collate(self, items: list[tuple[dict[str, torch.Tensor], dict]]) -> Batch:
        feats, metas = [f for f, _ in items], [m for _, m in items]
        if "pixels" in feats[0]:
            mean, logvar = to_unit(torch.stack([f.pop("pixels") for f in feats])), None
        else:
            mean = torch.stack([f.pop("mean") for f in feats]).float()
            logvar = torch.stack([f.pop("logvar") for f in feats]).float()
        return Batch(keys=[m["key"] for m in metas], captions=[m["caption"] for m in metas],
                     mean=mean, logvar=logvar, text=text_from_tensors(feats) if self.text else None)


IMAGE_TENSORS = ("pixels", "mean", "logvar")


def image_tensors(data: bytes) -> bytes:
    """The safetensors file `data` cut down to its image tensors (the text tensors' bytes are not copied)."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), memoryview(data)[8 + n:]
    kept, parts, at = {}, [], 0
    for name, info in header.items():
        if name in IMAGE_TENSORS:
            start, end = info["data_offsets"]
            kept[name] = {**info, "data_offsets": [at, at + end - start]}
            parts.append(body[start:end])
            at += end - start
    head = json.dumps(kept).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(parts)


class OnlineFeatures(_Source):
    """Reads filtered shards and runs the frozen VAE per step; text is left to the trainer."""

    uncond = None

    def __init__(self, recipe: Recipe, uri: str, batch_size: int, seed: int, rank: int, world: int, device,
                 caption: str = "synthetic_caption", max_bad_rate: float = 0.01):
        uris = input_shards(uri)
        if not uris:
            raise UserError(f"no shards in {uri!r}")
        super().__init__(uris, shard_counts(uris), batch_size, seed, rank, world, max_bad_rate)
        self.resolution, self.caption = recipe.model.resolution, caption
        self.encoder = ImageEncoder(recipe, pick_device(str(device)))
        self.latent_shift, self.latent_scale = self.encoder.shift, self.encoder.scale

    def _decode(self, sample: Sample, uri: str) -> tuple[str, str, torch.Tensor]:
        data = image_member(sample.members)
        if data is None:
            raise ValueError(f"sample '{sample.key}' has no image member")
        return sample.key, caption_of(sample, uri, self.caption), preprocess(data, self.resolution)

    def _collate(self, items: list[tuple[str, str, torch.Tensor]]) -> Batch:
        mean, logvar = self.encoder(torch.stack([p for _, _, p in items]))
        return Batch(keys=[k for k, _, _ in items], captions=[c for _, c, _ in items], mean=mean, logvar=logvar,
                     text=None)


def open_features(recipe: Recipe | str, data_uri: str, *, batch_size: int, seed: int, rank: int = 0,
                  world: int = 1, online: bool | None = None, device="cpu",
                  caption: str = "synthetic_caption", max_bad_rate: float = 0.01, text: bool = True) -> Features:
    """Cached features when `data_uri` holds a cache (its feature identity checked), else the online path.

    Samples that no longer read back are skipped and counted (`.bad`); above `max_bad_rate` of the
    data set the batches stop with a UserError. `device` is where the online path's VAE runs; cached
    batches are always in host memory. With `text=False` (a stage that computes its text online) cached batches
    carry no text and the cached text features are never decoded."""
    recipe = as_recipe(recipe)
    manifest = read_manifest(data_uri)
    if online is None:
        online = manifest is None
    if not online:
        if manifest is None:
            raise UserError(f"{data_uri}: no feature cache here (no complete manifest); build one with "
                            f"`fusedit cache build` or train online from the filtered shards")
        check_feature_identity(manifest, recipe)
        return CachedFeatures(data_uri, manifest, batch_size, seed, rank, world, max_bad_rate, text)
    if manifest is not None:
        raise UserError(f"{data_uri} is a feature cache (no images): online training needs the filtered shards")
    return OnlineFeatures(recipe, data_uri, batch_size, seed, rank, world, device, caption, max_bad_rate)
