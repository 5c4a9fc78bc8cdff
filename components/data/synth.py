"""The embedded default data set: procedurally drawn scenes as WebDataset shards, no network needed.

Every sample is a scene from `scenes` (image, full synthetic caption, short original caption, and
the scene description as `<key>.json`). A recorded fraction is deliberately broken, one defect per
sample, covering every kind of bad input the filter must catch; `synth.json` lists how many of each
and which reject reason the filter should give, so tests and reviewers can check the filter exactly.
Deterministic for a seed (per-sample RNGs, fixed tar mtimes).
"""
from __future__ import annotations

import io
import json
import os
import random
import struct
from collections import Counter
from typing import Any

from PIL import Image

from fusedit.components.data import scenes
from fusedit.components.shared import storage

# defect -> reject reason the filter must give (None: the filter repairs it and keeps the sample)
DEFECTS: dict[str, str | None] = {
    "truncated_jpeg": "decode_error",
    "random_bytes": "decode_error",
    "zero_byte": "empty_image",
    "tiny_1x1": "too_small",
    "bomb_header": "decompression_bomb",
    "png_alpha": None,
    "cmyk_jpeg": None,
    "missing_image": "missing_image",
    "missing_caption": "missing_caption",
    "empty_caption": "empty_caption",
    "invalid_utf8": "invalid_utf8",
    "long_caption": "caption_too_long",
    "bad_aspect": "bad_aspect",
    "duplicate_key": "duplicate_key",
    "exact_duplicate": "exact_duplicate",
    "near_duplicate": "near_duplicate",
}
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
CLEAN_HEAD = 2  # the first samples of each shard are never broken (duplicate-key sources)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _bomb_header(rng: random.Random) -> bytes:
    """A tiny valid JPEG whose frame header claims 30000x30000 pixels."""
    data = bytearray(_jpeg(Image.new("RGB", (16, 16), (rng.randint(0, 255), 80, 80))))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", 30000, 30000)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _size(rng: random.Random, short_side: tuple[int, int], aspects: tuple[float, ...]) -> tuple[int, int]:
    short = rng.randint(*short_side)
    a = rng.choice(aspects)
    return (round(short * a), short) if a >= 1 else (short, round(short / a))


def _good(rng: random.Random, key: str, short_side: tuple[int, int], aspects: tuple[float, ...],
          quality: int) -> dict[str, Any]:
    w, h = _size(rng, short_side, aspects)
    scene = scenes.sample_scene(rng, w, h)
    img = scenes.draw_scene(scene)
    return {"__key__": key, "image.jpg": _jpeg(img, quality),
            "synthetic_caption.txt": scenes.caption(scene).encode(),
            "original_caption.txt": scenes.short_caption(scene).encode(),
            "_meta": {"key": key, "scene": scene, "defect": None}, "_img": img, "_scene": scene}


def _apply(defect: str, s: dict[str, Any], rng: random.Random, source: dict[str, Any] | None) -> None:
    """Break (or transform) a good sample in place according to `defect`."""
    img: Image.Image = s["_img"]
    if defect == "truncated_jpeg":
        s["image.jpg"] = s["image.jpg"][: len(s["image.jpg"]) * 6 // 10]
    elif defect == "random_bytes":
        s["image.jpg"] = rng.randbytes(rng.randint(500, 5000))
    elif defect == "zero_byte":
        s["image.jpg"] = b""
    elif defect == "tiny_1x1":
        s["image.jpg"] = _jpeg(img.resize((1, 1)))
    elif defect == "bomb_header":
        s["image.jpg"] = _bomb_header(rng)
    elif defect == "png_alpha":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size).point(lambda v: 128 + v // 2))
        buf = io.BytesIO()
        rgba.save(buf, "PNG", compress_level=1)
        del s["image.jpg"]
        s["png"] = buf.getvalue()
    elif defect == "cmyk_jpeg":
        s["image.jpg"] = _jpeg(img.convert("CMYK"))
    elif defect == "missing_image":
        del s["image.jpg"]
    elif defect == "missing_caption":
        del s["synthetic_caption.txt"]
    elif defect == "empty_caption":
        s["synthetic_caption.txt"] = b" \n\t "
    elif defect == "invalid_utf8":
        s["synthetic_caption.txt"] = b"\xff\xfe " + s["synthetic_caption.txt"] + b" \xc3\x28"
    elif defect == "long_caption":
        s["synthetic_caption.txt"] = b" ".join([s["synthetic_caption.txt"]] * 60)
    elif defect == "bad_aspect":
        w = rng.randint(600, 900)
        s["image.jpg"] = _jpeg(scenes.draw_scene(s["_scene"], (w, w // 5)))
    elif defect == "duplicate_key":
        s["__key__"] = source["__key__"]  # a different scene reusing an earlier key of this shard
    elif defect == "exact_duplicate":
        for k in ("image.jpg", "synthetic_caption.txt", "original_caption.txt"):
            s[k] = source[k]
        s["_meta"] = {**source["_meta"], "key": s["__key__"]}
    elif defect == "near_duplicate":
        src = Image.open(io.BytesIO(source["image.jpg"])).convert("RGB")
        small = src.resize((round(src.width * 0.97), round(src.height * 0.97)), Image.Resampling.BILINEAR)
        s["image.jpg"] = _jpeg(small, 75)
        for k in ("synthetic_caption.txt", "original_caption.txt"):
            s[k] = source[k]
        s["_meta"] = {**source["_meta"], "key": s["__key__"]}
    else:
        raise ValueError(f"unknown defect {defect!r}")
    s["_meta"] = {**s["_meta"], "defect": defect}


def plan_defects(samples: int, shard_size: int, bad_fraction: float, seed: int) -> dict[int, str]:
    """Which sample index gets which defect: every kind equally often, never in a shard's head."""
    rng = random.Random(f"defects:{seed}")
    eligible = [i for i in range(samples) if i % shard_size >= CLEAN_HEAD]
    n_bad = min(len(eligible), round(samples * bad_fraction))
    chosen = sorted(rng.sample(eligible, n_bad))
    kinds = [k for _ in range(n_bad // len(DEFECTS) + 1) for k in DEFECTS][:n_bad]
    rng.shuffle(kinds)
    return dict(zip(chosen, kinds, strict=True))


def synth(out_dir: str, samples: int = 2000, seed: int = 0, shard_size: int = 500, bad_fraction: float = 0.1,
          short_side: tuple[int, int] = (160, 320), aspects: tuple[float, ...] = ASPECTS,
          jpeg_quality: int = 90) -> dict[str, Any]:
    """Write `samples` samples as shards `shard-NNNNNN.tar` + `synth.json` under out_dir (local or s3)."""
    import webdataset as wds

    if samples < 1 or shard_size < 1:
        raise ValueError("samples and shard_size must be positive")
    if not 0 <= bad_fraction <= 1:
        raise ValueError("bad_fraction must be in [0, 1]")
    plan = plan_defects(samples, shard_size, bad_fraction, seed)
    good_sources: list[dict[str, Any]] = []  # kept samples usable as duplicate originals
    shards: list[str] = []
    counts: Counter[str] = Counter()
    for first in range(0, samples, shard_size):
        name = f"shard-{first // shard_size:06d}.tar"
        shards.append(name)
        shard_good: list[dict[str, Any]] = []
        with storage.atomic_write(storage.join(out_dir, name)) as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for i in range(first, min(first + shard_size, samples)):
                rng = random.Random(f"{seed}:{i}")
                s = _good(rng, f"{i:08d}", short_side, aspects, jpeg_quality)
                defect = plan.get(i)
                if defect is not None:
                    pool = shard_good if defect == "duplicate_key" else good_sources
                    _apply(defect, s, rng, pool[rng.randrange(len(pool))] if pool else None)
                    counts[defect] += 1
                else:
                    shard_good.append(s)
                    good_sources.append(s)
                member = {k: v for k, v in s.items() if not k.startswith("_") or k == "__key__"}
                writer.write({**member, "json": json.dumps(s["_meta"], sort_keys=True).encode()})
                s["_img"] = s["_scene"] = None  # sources keep only bytes and captions
            writer.close()
        good_sources = good_sources[-256:]  # bounded memory; duplicates still cross shard borders
    expected: Counter[str] = Counter()
    for defect, n in counts.items():
        if DEFECTS[defect] is not None:
            expected[DEFECTS[defect]] += n
    summary = {
        "samples": samples, "seed": seed, "shard_size": shard_size, "bad_fraction": bad_fraction,
        "shards": shards, "defects": dict(sorted(counts.items())),
        "expected_rejects": dict(sorted(expected.items())),
        "expected_kept": samples - sum(expected.values()),
    }
    storage.write_json(storage.join(out_dir, "synth.json"), summary)
    return summary


def main_summary_line(summary: dict[str, Any], out_dir: str, seconds: float) -> str:
    bad = sum(summary["defects"].values())
    return (f"wrote {summary['samples']} samples ({bad} with defects) in {len(summary['shards'])} shards "
            f"to {os.path.join(out_dir, '')} in {seconds:.1f}s")
