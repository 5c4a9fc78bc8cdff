"""`fusedit cache build`: frozen-LLM text features and VAE posteriors, computed once for all epochs.

One output shard per input shard, written atomically and followed by a small done-marker, so an
interrupted build resumes at the first shard without one; the manifest is written last (S3: data
first, manifest last), so a cache is complete exactly when it has a manifest. Text features are
stored unpadded (real tokens only); captions of a chunk are bucketed by length before batching.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import save

from fusedit.components.cache.format import (
    DTYPES,
    FEATURES_EXT,
    KIND,
    MANIFEST,
    META_EXT,
    UNCOND,
    as_recipe,
    feature_identity,
    identity_digest,
    sources,
    text_spec,
    text_tensors,
)
from fusedit.components.cache.frozen import ImageEncoder, load_text_encoder, preprocess
from fusedit.components.shared import storage
from fusedit.components.shared.device import pick_device
from fusedit.components.shared.shards import caption_of, image_member, input_shards, read_samples, shard_counts
from fusedit.components.shared.tario import Sample, TarSink
from fusedit.errors import UserError
from fusedit.model.config import Recipe
from fusedit.model.text import llm_config_for, load_tokenizer

log = logging.getLogger(__name__)
# bytes assumed for a sample's meta.json in the size estimate (captions, scene, source; ~1.2 KB for synth data)
META_ALLOWANCE = 4096


class BuildResult(BaseModel):
    output: str
    n_samples: int
    n_shards: int
    shards_reused: int = 0
    bytes: int = 0
    bytes_per_sample: float = 0.0
    estimated_bytes_per_sample: float = 0.0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    reused: bool = False


def bytes_per_sample(recipe: Recipe, dtype: str, tokens: float, meta_bytes: float) -> dict[str, float]:
    """Stored bytes per sample, from the shapes (no model run needed)."""
    m, spec = recipe.model, text_spec(recipe)
    cfg = llm_config_for(m.llm)
    size = DTYPES[dtype].itemsize
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = (2 * len(spec.layers) * cfg.num_key_value_heads * head_dim if spec.kind == "kv"
                 else cfg.hidden_size) * size
    side = m.resolution // m.vae_scale
    image = 2 * m.in_channels * side * side * 4 if m.vae else 3 * side * side
    pooled = m.text_modulation.dim * size if m.text_modulation else 0
    text = per_token * tokens + pooled
    overhead = meta_bytes + 4 * 512 + 64 * (2 * len(spec.layers) + 3)  # tar headers/padding, tensor headers
    return {"image": image, "text": text, "overhead": overhead, "total": image + text + overhead,
            "per_token": per_token}


def _meta(sample: Sample, caption: str, n_tokens: int, uri: str) -> dict[str, Any]:
    scene = sample.members.get("json")
    return {"key": sample.key, "caption": caption, "n_tokens": n_tokens,
            "captions": {ext[:-4]: v.decode("utf-8", "replace") for ext, v in sample.members.items()
                         if ext.endswith(".txt")},
            "scene": json.loads(scene) if scene else None, "source": {"shard": uri, "index": sample.index}}


def _estimate(recipe: Recipe, dtype: str) -> dict[str, float]:
    """Bytes per stored sample from the recipe's shapes alone (no shard is read): text features at the most
    tokens the encoder keeps (max_prompt_length + the instruction's), so real captions, stored unpadded,
    take less; the image tensor; and META_ALLOWANCE for the sample's meta record."""
    tok = load_tokenizer(recipe.model.tokenizer or recipe.model.llm)
    spec = text_spec(recipe)
    limit = spec.max_length + (len(tok(spec.instruction, add_special_tokens=False).input_ids)
                               if spec.instruction else 0)
    return {**bytes_per_sample(recipe, dtype, limit, META_ALLOWANCE), "tokens": limit}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n}"


class _Encoders:
    """The frozen text and image encoders, loaded once per build."""

    def __init__(self, recipe: Recipe, device: torch.device, dtype: torch.dtype, batch_size: int):
        self.text = load_text_encoder(recipe, device)
        self.image = ImageEncoder(recipe, device)
        self.resolution, self.dtype, self.batch_size = recipe.model.resolution, dtype, batch_size

    @torch.no_grad()
    def texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per caption, unpadded features; captions are sorted by token count before batching."""
        tok, spec = self.text.tokenizer, self.text.spec
        lengths = [len(ids) for ids in tok([spec.instruction + c for c in captions], truncation=True,
                                           max_length=self.text.max_length).input_ids]
        order = sorted(range(len(captions)), key=lambda i: (lengths[i], i))
        out: list[dict[str, torch.Tensor]] = [{}] * len(captions)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            ctx = self.text.encode([captions[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = text_tensors(ctx, j, self.dtype)
        return out

    @torch.no_grad()
    def images(self, pixels: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for b in range(0, len(pixels), self.batch_size):
            chunk = torch.stack(pixels[b:b + self.batch_size])
            if self.image.vae is None:
                out += [{"pixels": p} for p in chunk]
                continue
            mean, logvar = self.image(chunk)
            out += [{"mean": m.float().cpu().contiguous(), "logvar": lv.float().cpu().contiguous()}
                    for m, lv in zip(mean, logvar, strict=True)]
        return out


def n_tokens(txt: dict[str, torch.Tensor]) -> int:
    return int(txt["k0"].shape[1]) if "k0" in txt else int(txt["states"].shape[0])


def _write_shard(enc: _Encoders, uri: str, target: str, caption: str, chunk: int,
                 on_samples: Callable[[int], None]) -> dict[str, Any]:
    """Encode one input shard into `target` (atomic); returns its done-marker record."""
    n, tokens = 0, 0
    with storage.atomic_write(target) as f:
        sink = TarSink(f)

        def flush(batch: list[Sample]) -> None:
            nonlocal n, tokens
            caps = [caption_of(s, uri, caption) for s in batch]
            pixels = []
            for s in batch:
                data = image_member(s.members)
                if data is None:
                    raise UserError(f"{uri}: sample '{s.key}' (#{s.index}) has no image member")
                pixels.append(preprocess(data, enc.resolution))
            for s, cap, txt, img in zip(batch, caps, enc.texts(caps), enc.images(pixels), strict=True):
                n_tok = n_tokens(txt)
                sink.write(s.key, {FEATURES_EXT: save({**img, **txt}),
                                   META_EXT: json.dumps(_meta(s, cap, n_tok, uri), sort_keys=True).encode()})
                tokens += n_tok
            n += len(batch)
            on_samples(len(batch))

        pending: list[Sample] = []
        for s in read_samples(uri):
            pending.append(s)
            if len(pending) == chunk:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
        sink.close()
        size = f.tell()
    return {"n": n, "bytes": size, "tokens": tokens}


def _clean_partials(output: str) -> None:
    """Remove temp files of a killed run (local only; S3 objects only appear whole)."""
    d = os.path.join(output, "shards")
    if not storage.is_s3(output) and os.path.isdir(d):
        for name in os.listdir(d):
            if name.endswith(".part"):
                os.unlink(os.path.join(d, name))


def _reusable(old: dict | None, digest: str, inputs: list[list]) -> bool:
    return bool(old) and old.get("digest") == digest and old.get("inputs") == inputs


def _project(recipe: Recipe, input: str, shards: list[str], dtype: str, max_bytes: int | None,
             echo: Callable[[str], None]) -> tuple[int, dict[str, float]]:
    """(samples in the input, estimated bytes per sample); refuses a cache over max_bytes before writing.

    Sample counts come from the filter's manifest where it has them; the estimate reads no shard."""
    total = sum(shard_counts(shards))
    if total == 0:
        raise UserError(f"input {input!r} holds no samples ({len(shards)} empty shard(s))")
    est = _estimate(recipe, dtype)
    projected = est["total"] * total
    echo(f"cache: at most {human(est['total'])}/sample (image {human(est['image'])}, text {human(est['text'])}: "
         f"{est['tokens']:.0f} tokens x {human(est['per_token'])}/token, {dtype}) x {total} samples "
         f"= projected {human(projected)}")
    if max_bytes is not None and projected > max_bytes:
        raise UserError(f"projected cache size {human(projected)} ({projected:.0f} bytes: {human(est['total'])}"
                        f"/sample x {total} samples) exceeds --max-bytes {human(max_bytes)}; nothing written")
    return total, est


def _encode_shards(enc: _Encoders, shards: list[str], identities: list, output: str, digest: str, caption: str,
                   bar, echo: Callable[[str], None]) -> tuple[list[dict[str, Any]], int, int]:
    """Encode every input shard whose done-marker is missing or stale: (records, shards reused, samples reused)."""
    records, reused, done_before = [], 0, 0
    for i, (uri, ident) in enumerate(zip(shards, identities, strict=True)):
        name = f"shards/shard-{i:06d}"
        tar_uri, done_uri = storage.join(output, name + ".tar"), storage.join(output, name + ".json")
        want = {"input": uri, "identity": ident, "digest": digest}
        rec = storage.read_json(done_uri) if storage.exists(done_uri) else None
        if rec and all(rec.get(k) == v for k, v in want.items()) and storage.exists(tar_uri):
            reused += 1
            done_before += rec["n"]
            bar.update(rec["n"])
        else:
            rec = {**want, "name": name + ".tar",
                   **_write_shard(enc, uri, tar_uri, caption, 8 * enc.batch_size, bar.update)}
            storage.write_json(done_uri, rec)  # after the shard: a marker means a complete shard
        records.append(rec)
        echo(f"cache: shard {i + 1}/{len(shards)} done ({rec['n']} samples)")
    return records, reused, done_before


def _manifest(recipe: Recipe, feature_id: dict[str, Any], digest: str, dtype: str, inputs: list[list],
              records: list[dict[str, Any]], est: dict[str, float], enc: _Encoders) -> dict[str, Any]:
    n = sum(r["n"] for r in records)
    n_bytes = sum(r["bytes"] for r in records)
    return {
        "kind": KIND, "digest": digest, "feature_identity": feature_id, "dtype": dtype, "sources": sources(recipe),
        "inputs": inputs, "shards": [{"name": r["name"], "n": r["n"], "bytes": r["bytes"]} for r in records],
        "uncond": UNCOND, "n_samples": n, "bytes": n_bytes, "bytes_per_sample": n_bytes / n,
        "estimated_bytes_per_sample": est["total"], "mean_tokens": sum(r["tokens"] for r in records) / n,
        "latent_shift": enc.image.shift, "latent_scale": enc.image.scale, "pixel_space": enc.image.vae is None,
    }


def build_cache(input: str, output: str, recipe: Recipe | str, overrides: list[str] | None = None,
                dtype: str = "bf16", max_bytes: int | None = None, batch_size: int = 32,
                device: str | None = None, caption: str = "synthetic_caption",
                echo: Callable[[str], None] | None = None, progress: bool | None = None) -> BuildResult:
    """Build (or resume, or reuse) the feature cache of `input` for `recipe` into `output`."""
    from tqdm import tqdm

    from fusedit.model.config import load_recipe

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    recipe = load_recipe(recipe, overrides) if isinstance(recipe, str) else as_recipe(recipe)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if batch_size < 1:
        raise UserError("--batch-size must be positive")
    shards = input_shards(input)
    if not shards:
        raise UserError(f"no shards in input {input!r}")
    feature_id = feature_identity(recipe)  # a missing LLM/tokenizer/VAE fails here, before anything is written
    digest = identity_digest(feature_id, dtype)
    identities = [storage.stat(u) for u in shards]
    inputs = [[u, i] for u, i in zip(shards, identities, strict=True)]
    manifest_uri = storage.join(output, MANIFEST)
    old = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else None
    if _reusable(old, digest, inputs):
        echo(f"cache: {output} already holds this cache; nothing to do")
        return BuildResult(output=output, n_samples=old["n_samples"], n_shards=len(old["shards"]),
                           bytes=old["bytes"], bytes_per_sample=old["bytes_per_sample"], reused=True)
    total, est = _project(recipe, input, shards, dtype, max_bytes, echo)
    if old is not None:
        storage.remove(manifest_uri)  # from here on the old cache no longer looks complete
    _clean_partials(output)

    enc = _Encoders(recipe, pick_device(device), DTYPES[dtype], batch_size)
    storage.write_bytes(storage.join(output, UNCOND), save(enc.texts([""])[0]))
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="sample", desc="cache", disable=None if progress is None else not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        records, reused, done_before = _encode_shards(enc, shards, identities, output, digest, caption, bar, echo)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    manifest = _manifest(recipe, feature_id, digest, dtype, inputs, records, est, enc)
    storage.write_json(manifest_uri, manifest)
    n, n_bytes = manifest["n_samples"], manifest["bytes"]
    rate = (n - done_before) / seconds if seconds > 0 else 0.0
    echo(f"cache: {n} samples in {len(records)} shards ({reused} reused), {human(n_bytes)} "
         f"({human(n_bytes / n)}/sample), {rate:.1f} samples/s -> {output}")
    return BuildResult(output=output, n_samples=n, n_shards=len(records), shards_reused=reused, bytes=n_bytes,
                       bytes_per_sample=n_bytes / n, estimated_bytes_per_sample=est["total"],
                       seconds=round(seconds, 3), samples_per_s=round(rate, 2))
