"""What the trainer reads each step: cached features or features computed online, behind one interface.

Both paths visit samples in the same order (`order.SampleOrder`), so a run can switch between them
and `batches(start_step)` resumes exactly where an uninterrupted run would be. Only the shard that
holds the current samples is kept in memory (raw bytes; only the samples this rank uses are decoded).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from fusedit.components import storage
from fusedit.components.cache import caption_of, count_samples, input_shards, read_samples
from fusedit.components.cache_format import (
    FEATURES_EXT,
    META_EXT,
    as_recipe,
    check_fingerprint,
    read_manifest,
    text_from_tensors,
)
from fusedit.components.frozen import ImageEncoder, image_member, pick_device, preprocess, sample_x0, to_unit
from fusedit.components.order import SampleOrder
from fusedit.components.tario import Sample
from fusedit.errors import UserError
from fusedit.model.config import Recipe
from fusedit.model.text import TextContext

__all__ = ["Batch", "Features", "check_fingerprint", "open_features", "sample_x0"]


@dataclass
class Batch:
    keys: list[str]
    captions: list[str]  # the caption trained on (the synthetic caption)
    mean: torch.Tensor  # (B, C, H, W) raw VAE posterior mean, or pixels in [-1, 1] in pixel space
    logvar: torch.Tensor | None  # (B, C, H, W); None in pixel space
    text: TextContext | None  # cached text features padded within the batch; None online


class Features(Protocol):
    uncond: TextContext | None  # cached empty-caption features (None online)
    latent_shift: float  # x0 = (sample - shift) * scale; (0, 1) in pixel space
    latent_scale: float

    def batches(self, start_step: int = 0) -> Iterator[Batch]: ...


class _ShardBuffer:
    """The raw samples of the one shard in use; the stream never returns to a shard within an epoch."""

    def __init__(self, uris: list[str]):
        self.uris, self.current, self.samples = uris, -1, {}

    def get(self, shard: int, index: int) -> Sample:
        if shard != self.current:
            self.samples, self.current = {}, -1
            self.samples = {s.index: s for s in read_samples(self.uris[shard])}
            self.current = shard
        return self.samples[index]


class _Source:
    def __init__(self, uris: list[str], counts: list[int], batch_size: int, seed: int, rank: int, world: int):
        self.uris = uris
        self.order = SampleOrder(counts, seed, batch_size, rank, world)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        if start_step < 0:
            raise UserError(f"start_step must be >= 0 (got {start_step})")
        buf = _ShardBuffer(self.uris)
        step = start_step
        while True:
            picks = self.order.step(step)
            yield self._batch([buf.get(s, i) for s, i in picks], [self.uris[s] for s, _ in picks])
            step += 1

    def _batch(self, samples: list[Sample], uris: list[str]) -> Batch:
        raise NotImplementedError


class CachedFeatures(_Source):
    """Reads `fusedit cache build` output: no LLM and no VAE in memory."""

    def __init__(self, uri: str, manifest: dict, batch_size: int, seed: int, rank: int, world: int, device):
        from safetensors.torch import load

        shards = manifest["shards"]
        super().__init__([storage.join(uri, s["name"]) for s in shards], [s["n"] for s in shards],
                         batch_size, seed, rank, world)
        self.device = torch.device(device)
        self.uncond = text_from_tensors([load(storage.read_bytes(storage.join(uri, manifest["uncond"])))],
                                        device=self.device)
        self.latent_shift, self.latent_scale = float(manifest["latent_shift"]), float(manifest["latent_scale"])

    def _batch(self, samples: list[Sample], uris: list[str]) -> Batch:
        from safetensors.torch import load

        feats = [load(s.members[FEATURES_EXT]) for s in samples]
        metas = [json.loads(s.members[META_EXT]) for s in samples]
        if "pixels" in feats[0]:
            mean, logvar = to_unit(torch.stack([f.pop("pixels") for f in feats])), None
        else:
            mean = torch.stack([f.pop("mean") for f in feats]).float()
            logvar = torch.stack([f.pop("logvar") for f in feats]).float().to(self.device)
        return Batch(keys=[m["key"] for m in metas], captions=[m["caption"] for m in metas],
                     mean=mean.to(self.device), logvar=logvar, text=text_from_tensors(feats, device=self.device))


class OnlineFeatures(_Source):
    """Reads filtered shards and runs the frozen VAE per step; text is left to the trainer."""

    uncond = None

    def __init__(self, recipe: Recipe, uri: str, batch_size: int, seed: int, rank: int, world: int, device,
                 caption: str = "synthetic_caption"):
        uris = input_shards(uri)
        if not uris:
            raise UserError(f"no shards in {uri!r}")
        super().__init__(uris, [count_samples(u) for u in uris], batch_size, seed, rank, world)
        self.resolution, self.caption = recipe.model.resolution, caption
        self.encoder = ImageEncoder(recipe, pick_device(str(device)))
        self.latent_shift, self.latent_scale = self.encoder.shift, self.encoder.scale

    def _batch(self, samples: list[Sample], uris: list[str]) -> Batch:
        captions, pixels = [], []
        for s, uri in zip(samples, uris, strict=True):
            captions.append(caption_of(s, uri, self.caption))
            data = image_member(s.members)
            if data is None:
                raise UserError(f"{uri}: sample '{s.key}' has no image member")
            pixels.append(preprocess(data, self.resolution))
        mean, logvar = self.encoder(torch.stack(pixels))
        return Batch(keys=[s.key for s in samples], captions=captions, mean=mean, logvar=logvar, text=None)


def open_features(recipe: Recipe | str, data_uri: str, *, batch_size: int, seed: int, rank: int = 0,
                  world: int = 1, online: bool | None = None, device="cpu",
                  caption: str = "synthetic_caption") -> Features:
    """Cached features when `data_uri` holds a cache (fingerprint checked), else the online path."""
    recipe = as_recipe(recipe)
    manifest = read_manifest(data_uri)
    if online is None:
        online = manifest is None
    if not online:
        if manifest is None:
            raise UserError(f"{data_uri}: no feature cache here (no complete manifest); build one with "
                            f"`fusedit cache build` or train online from the filtered shards")
        check_fingerprint(manifest, recipe)
        return CachedFeatures(data_uri, manifest, batch_size, seed, rank, world, device)
    if manifest is not None:
        raise UserError(f"{data_uri} is a feature cache (no images): online training needs the filtered shards")
    return OnlineFeatures(recipe, data_uri, batch_size, seed, rank, world, device, caption)
