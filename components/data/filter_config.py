"""The filter step's typed configuration: every threshold in one place, loadable from YAML.

Kept free of heavy imports so the CLI, DVC and KFP drivers can build and validate it cheaply.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusedit.errors import UserError, read_yaml


class Columns(BaseModel):
    """Which tar members hold what. Input fields are tried in order; the first present one wins.

    The reference layout is `<key>.image.jpg`, `<key>.synthetic_caption.txt`,
    `<key>.original_caption.txt`, `<key>.json`. For public shards such as cc12m-wds
    (`<key>.jpg` + `<key>.txt`) set `caption: original_caption` (its `txt` is an alt-text).
    Output always uses the reference layout: `image.jpg`, `<text name>.txt`, passthrough fields.
    """

    model_config = ConfigDict(extra="forbid")
    image: list[str] = ["image.jpg", "jpg", "jpeg", "png", "webp"]
    texts: dict[str, list[str]] = {
        "synthetic_caption": ["synthetic_caption.txt"],
        "original_caption": ["original_caption.txt", "txt"],
    }
    caption: str = "synthetic_caption"  # the text that is checked (must be present) and trained on
    passthrough: list[str] = ["json"]

    @model_validator(mode="after")
    def _caption_is_a_text(self) -> Columns:
        if self.caption not in self.texts:
            raise ValueError(f"caption {self.caption!r} is not one of texts {sorted(self.texts)}")
        return self


class QualityThresholds(BaseModel):
    """Batch-level limits the data-quality suite checks (fractions of input samples)."""

    model_config = ConfigDict(extra="forbid")
    max_reject_rate: float = Field(0.3, ge=0, le=1)
    max_duplicate_rate: float = Field(0.1, ge=0, le=1)
    max_decode_failure_rate: float = Field(0.1, ge=0, le=1)


class S3Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    endpoint_url: str | None = None  # else FUSEDIT_S3_ENDPOINT / AWS_ENDPOINT_URL / AWS default
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0)


class FilterConfig(BaseModel):
    """Everything `filter_shards` needs. `input`/`output` usually come from the command line."""

    model_config = ConfigDict(extra="forbid")
    input: str = ""  # shard paths / brace patterns / directories / s3 prefixes, space separated
    output: str = ""  # local directory or s3:// prefix
    tokenizer: str | None = None  # AutoTokenizer path; None skips the token-length check
    columns: Columns = Columns()
    min_side: int = Field(64, ge=1)
    min_aspect: float = Field(0.33, gt=0)  # width / height
    max_aspect: float = Field(3.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard, checked before decoding
    full_color_decode: bool = False  # also colour-convert RGB JPEGs that pass through (slower)
    max_member_bytes: int = Field(64 << 20, ge=1)
    max_caption_chars: int = Field(2000, ge=1)
    max_caption_tokens: int = Field(256, ge=1)
    dedupe_exact: bool = True
    dedupe_near: bool = True
    near_threshold: int = Field(4, ge=0, le=20)  # max Hamming distance of 64-bit perceptual hashes
    jpeg_quality: int = Field(95, ge=1, le=100)  # for images that must be re-encoded (non-RGB, PNG)
    samples_per_shard: int = Field(1000, ge=1)
    workers: int = Field(0, ge=0)  # 0 = all cores
    on_bad_shard: Literal["reject", "error"] = "reject"  # truncated / non-tar shard
    report: bool = True  # data-quality suite + HTML report
    fail_on_quality: bool = False
    quality: QualityThresholds = QualityThresholds()
    thumbnails: int = Field(24, ge=0)  # kept samples shown in the HTML report (a seeded sample)
    examples_per_reason: int = Field(3, ge=0, le=50)  # rejected samples shown per reject reason
    example_seed: int = 0  # which samples the report shows (a bottom-k sample by a seeded hash)
    work_dir: str | None = None  # resume state; default <output>/.work (local) or a cache dir (s3)
    keep_work: bool = False
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _aspect_order(self) -> FilterConfig:
        if self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect {self.min_aspect} > max_aspect {self.max_aspect}")
        return self

    def shard_fingerprint(self) -> str:
        """Hash of the settings that change per-shard results (resume only reuses matching work)."""
        keys = ["tokenizer", "columns", "min_side", "min_aspect", "max_aspect", "max_pixels",
                "max_member_bytes", "max_caption_chars", "full_color_decode", "max_caption_tokens", "jpeg_quality",
                "thumbnails", "examples_per_reason", "example_seed"]
        blob = json.dumps(self.model_dump(include=set(keys)), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run_fingerprint(self) -> str:
        """Hash of everything that changes the published output (not workers or paths of state)."""
        blob = json.dumps(self.model_dump(exclude={"workers", "work_dir", "keep_work", "s3"}),
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_filter_config(path: str | None = None, section: str | None = None,
                       **overrides: Any) -> FilterConfig:
    """Defaults <- YAML file (optionally one dotted section of it) <- non-None overrides."""
    data: dict[str, Any] = {}
    if path:
        loaded = read_yaml(path, "config file") or {}
        for part in (section.split(".") if section else []):
            if not isinstance(loaded, dict) or part not in loaded:
                raise UserError(f"config file {path} has no section {section!r}")
            loaded = loaded[part]
        if not isinstance(loaded, dict):
            raise UserError(f"config {path}{':' + section if section else ''} must be a mapping")
        data = loaded
    data.update({k: v for k, v in overrides.items() if v is not None})
    return FilterConfig.model_validate(data)
