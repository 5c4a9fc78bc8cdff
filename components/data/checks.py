"""Per-sample checks of the filter: full decode, bomb guard, RGB, sizes, captions, hashes.

One pure function, `judge`, decides a sample and prepares its output members; global decisions
(duplicates across shards) come later in `dedupe`.
"""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile

from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.shared.tario import Sample, unsafe_key

# Reasons, in the order checks run. Decode failures feed the decode-failure rate.
DECODE_REASONS = ("missing_image", "empty_image", "decode_error", "decompression_bomb", "member_too_large")
REASONS = ("truncated_shard", "unsafe_key", "duplicate_key", *DECODE_REASONS, "too_small", "bad_aspect",
           "missing_caption", "invalid_utf8", "empty_caption", "caption_too_long",
           "exact_duplicate", "near_duplicate")
_WS = re.compile(r"\s+")


# One stats row per sample; also the columns of an empty stats table (every shard broken or empty).
EMPTY_ROW: dict[str, Any] = {
    "key": None, "shard": None, "index": None, "width": None, "height": None,
    "aspect": None, "mode": None, "format": None, "image_bytes": None, "caption": None,
    "caption_chars": None, "caption_tokens": None, "exact_hash": None, "phash": None,
    "converted": False, "duplicate_of": None, "decision": "rejected", "reason": None, "detail": "",
}


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class Judged:
    row: dict[str, Any]  # one stats row (no decision yet when kept)
    members: dict[str, bytes] | None = None  # output members when the sample passes
    image: Image.Image | None = None  # decoded image (RGB, or L for pass-through JPEGs)
    image_data: bytes | None = None

    def rgb(self) -> Image.Image | None:
        """The image in colour (decodes again for pass-through JPEGs; used for a few thumbnails)."""
        if self.image is None or self.image.mode == "RGB":
            return self.image
        return Image.open(io.BytesIO(self.image_data)).convert("RGB")


def printable_key(key: str) -> str:
    """The key as valid text for rows, rejects.jsonl and parquet: non-UTF-8 bytes of a tar name become \\xNN."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def normalize_text(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _pick(members: dict[str, bytes], names: list[str]) -> tuple[str, bytes] | None:
    for name in names:
        if name in members:
            return name, members[name]
    return None


def decode_image(data: bytes, cfg: FilterConfig) -> tuple[Image.Image, str, str]:
    """Fully decode or raise Reject; returns (image, original mode, original format).

    The whole compressed stream is always decoded at full resolution, so truncation and corruption
    anywhere fail. An RGB JPEG is kept byte-for-byte, so unless `full_color_decode` is set it is
    decoded to luminance only (libjpeg still entropy-decodes every component; it skips chroma
    upsampling and colour conversion): the same validation at about half the cost. The returned
    image is then mode "L"; every other input is converted to RGB (alpha composited on white).
    """
    if not data:
        raise Reject("empty_image", "0 bytes")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image must fail, never be padded grey
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_pixels:
                raise Reject("decompression_bomb", f"header claims {w}x{h} > {cfg.max_pixels} pixels")
            passthrough = img.format == "JPEG" and img.mode == "RGB"
            if passthrough and not cfg.full_color_decode:
                img.draft("L", img.size)
            img.load()
    except Reject:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Reject("decompression_bomb", str(exc)[:200]) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, with its message
        detail = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")  # no memory addresses:
        raise Reject("decode_error", detail[:200]) from None  # the same input gives the same rejects file
    fmt = img.format or ""
    if passthrough:
        return img, "RGB", fmt
    mode = img.mode
    if mode != "RGB":
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    return img, mode, fmt


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash (imagehash's DCT hash) of a grey 32x32 box-filtered copy.

    imagehash resizes to 32x32 itself; box-filtering to exactly that size first is several times
    cheaper on large images and more stable under small rescales than its Lanczos resize.
    """
    import imagehash

    grey = img if img.mode == "L" else img.convert("L")
    return int(str(imagehash.phash(grey.resize((32, 32), Image.Resampling.BOX))), 16)


def _check_member(sample: Sample, row: dict[str, Any], cfg: FilterConfig) -> tuple[str, bytes]:
    """The key and the image member: (image extension, image bytes), or a Reject."""
    cols = cfg.columns
    if why := unsafe_key(sample.key):
        raise Reject("unsafe_key", f"key {row['key']!r}: {why}")
    if sample.duplicate_key:
        raise Reject("duplicate_key", f"key {sample.key!r} appeared earlier in the shard")
    if any(ext in cols.image for ext in sample.oversized):
        raise Reject("member_too_large", f"image larger than {cfg.max_member_bytes} bytes")
    picked = _pick(sample.members, cols.image)
    if picked is None:
        raise Reject("missing_image", f"no member among {cols.image}")
    return picked


def _check_image(data: bytes, judged: Judged, cfg: FilterConfig) -> tuple[str, str]:
    """Decode the image into `judged` and check its size and aspect; returns (mode, format)."""
    row = judged.row
    row["image_bytes"] = len(data)
    img, mode, fmt = decode_image(data, cfg)
    w, h = img.size
    row.update(width=w, height=h, aspect=round(w / h, 4), mode=mode, format=fmt)
    judged.image, judged.image_data = img, data
    if min(w, h) < cfg.min_side:
        raise Reject("too_small", f"{w}x{h}, short side < {cfg.min_side}")
    if not cfg.min_aspect <= w / h <= cfg.max_aspect:
        raise Reject("bad_aspect", f"aspect {w / h:.3f} outside [{cfg.min_aspect}, {cfg.max_aspect}]")
    return mode, fmt


def _check_texts(sample: Sample, row: dict[str, Any], cfg: FilterConfig, tokenizer: Any) -> dict[str, str]:
    """Every text column found, normalised; the caption must be present, non-empty and not too long."""
    cols = cfg.columns
    texts: dict[str, str] = {}
    for name, candidates in cols.texts.items():
        found = _pick(sample.members, candidates)
        if found is None:
            continue
        try:
            texts[name] = normalize_text(found[1].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise Reject("invalid_utf8", f"{found[0]}: {exc.reason} at byte {exc.start}") from None
    if cols.caption not in texts:
        raise Reject("missing_caption", f"no member among {cols.texts[cols.caption]}")
    cap = texts[cols.caption]
    row.update(caption=cap, caption_chars=len(cap))
    if not cap:
        raise Reject("empty_caption", "caption is empty after whitespace normalisation")
    if len(cap) > cfg.max_caption_chars:
        raise Reject("caption_too_long", f"{len(cap)} characters > {cfg.max_caption_chars}")
    if tokenizer is not None:
        n_tok = count_tokens(tokenizer, cap)
        row["caption_tokens"] = n_tok
        if n_tok > cfg.max_caption_tokens:
            raise Reject("caption_too_long", f"{n_tok} tokens > {cfg.max_caption_tokens}")
    return texts


def _kept_members(sample: Sample, judged: Judged, image_ext: str, mode: str, fmt: str, texts: dict[str, str],
                  cfg: FilterConfig) -> dict[str, bytes]:
    """What a kept sample is written as: an RGB JPEG (the original bytes when already one), its texts and the
    pass-through members."""
    data = judged.image_data
    if fmt == "JPEG" and mode == "RGB" and image_ext.endswith(("jpg", "jpeg")):
        out_image = data  # already an RGB JPEG: keep the original bytes, no re-encoding loss
    else:
        buf = io.BytesIO()
        judged.rgb().save(buf, "JPEG", quality=cfg.jpeg_quality)
        out_image = buf.getvalue()
        judged.row["converted"] = True
    members = {"image.jpg": out_image}
    members.update({f"{name}.txt": text.encode() for name, text in texts.items()})
    members.update({ext: sample.members[ext] for ext in cfg.columns.passthrough if ext in sample.members})
    return members


def judge(sample: Sample, shard: str, cfg: FilterConfig, tokenizer: Any = None) -> Judged:
    """Decide one sample on its own (everything except cross-sample duplicates): key and image member, image,
    texts, then the kept members; the first failed check is the sample's reject reason."""
    row: dict[str, Any] = {**EMPTY_ROW, "key": printable_key(sample.key), "shard": shard, "index": sample.index}
    judged = Judged(row=row)
    try:
        image_ext, data = _check_member(sample, row, cfg)
        mode, fmt = _check_image(data, judged, cfg)
        texts = _check_texts(sample, row, cfg, tokenizer)
        row["exact_hash"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        row["phash"] = f"{phash(judged.image):016x}"
        judged.members = _kept_members(sample, judged, image_ext, mode, fmt, texts, cfg)
        row["decision"] = "kept"
    except Reject as rej:
        row["reason"], row["detail"] = rej.reason, rej.detail
    return judged
