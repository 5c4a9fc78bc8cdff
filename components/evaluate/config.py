"""The evaluation step's settings (`EvalConfig`), from params.yaml's `eval:` section or a file, plus CLI overrides.

This is the evaluate step's public config: the ablation spec reads it to validate a variant's eval settings.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fusedit.errors import UserError, read_yaml


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", title="EvalConfig")

    pipeline: str  # exported pipeline directory or s3:// prefix
    output: str
    suites: list[str] = Field(default_factory=lambda: ["synthetic"], min_length=1)
    steps: int = Field(25, ge=1)
    guidance: float = Field(6.0, ge=0.0)
    seed: int = 42
    batch_size: int = Field(16, ge=1)
    resolution: int | None = Field(None, ge=8)  # None: the pipeline's own (512 for the real recipes)
    images_per_prompt: int = Field(1, ge=1)  # the synthetic suite's
    geneval_images_per_prompt: int = Field(4, ge=1)  # GenEval's protocol: 4
    dpg_images_per_prompt: int = Field(4, ge=1, le=4)  # DPG-Bench: 4, tiled 2x2 in one file per prompt
    fid_images_per_prompt: int = Field(1, ge=1)  # MJHQ-30K FID: 1
    limit: int | None = Field(None, ge=1)  # at most this many prompts per suite
    device: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    overwrite: bool = False  # discard samples drawn with other settings instead of refusing
    progress: bool = True
    synthetic_per_category: int = Field(8, ge=1)
    synthetic_seed: int = 0
    geneval_metadata: str | None = None
    geneval_results: str | None = None
    dpg_prompts: str | None = None
    fid_real: str | None = None
    fid_prompts: str | None = None
    fid_features: str = "inception"
    fid_weights: str | None = None
    fid_max_real: int | None = None
    clip_model: str | None = None
    clip_prompts: str | None = None

    def images_for(self, suite: str) -> int:
        """Images drawn per prompt by `suite` (clipscore: always 1)."""
        return {"synthetic": self.images_per_prompt, "geneval": self.geneval_images_per_prompt,
                "dpg": self.dpg_images_per_prompt, "fid": self.fid_images_per_prompt}.get(suite, 1)


def load_config(path: str, section: str | None = "eval", **overrides: Any) -> EvalConfig:
    """EvalConfig from a YAML file's section (e.g. params.yaml `eval:`), with CLI overrides on top."""
    data = read_yaml(path, "config file") or {}
    for part in (section or "").split("."):
        if part:
            if not isinstance(data, dict) or part not in data:
                raise UserError(f"{path}: no section '{section}'")
            data = data[part]
    if not isinstance(data or {}, dict):
        raise UserError(f"{path}: section '{section}' must be a mapping")
    return EvalConfig.model_validate({**(data or {}), **{k: v for k, v in overrides.items() if v is not None}})
