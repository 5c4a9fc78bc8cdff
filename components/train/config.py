"""Typed training stages, as declared in params.yaml (`train:`): one pipeline step per stage."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusedit.errors import UserError, read_yaml


class Stage(BaseModel):
    """One fine-tuning stage. Defaults are the reference recipe (AdamW 1e-4, wd 1e-4, clip 1, EMA 0.99/100)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    steps: int = Field(gt=0)
    batch_size: int = Field(16, gt=0)  # global batch, split over ranks
    lr: float = Field(1e-4, gt=0)
    llm_lr: float = Field(1e-5, ge=0)  # only for trains: dit+llm
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(0, ge=0)
    # after the warm-up: keep the LR, or decay it along a half cosine to min_lr_ratio x LR at the last step
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    trains: Literal["dit", "dit+llm"] = "dit"
    ema_decay: float = Field(0.99, ge=0, lt=1)
    ema_every: int = Field(100, gt=0)
    init_from: str | None = None  # a previous stage's name (its output beside ours) or a stage output URI
    upstream: str | None = None  # orchestration only: the path DVC makes this stage depend on
    resolution: int | None = Field(None, gt=0)  # overrides the recipe's model.resolution
    save_every: int = Field(50, gt=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    sample_every: int = Field(0, ge=0)  # 0: only at the end
    sample_prompts: list[str] = ["a red circle to the left of a blue square", "two green triangles"]
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    strategy: Literal["auto", "ddp", "fsdp", "hsdp"] = "auto"  # several ranks (torchrun): auto = DDP
    shard_group: int | None = Field(None, gt=0)  # hsdp: ranks per shard group (default: one node's ranks)
    max_bad_sample_rate: float = Field(0.01, ge=0, le=1)  # unreadable samples skipped; more of the data: error
    activation_checkpointing: bool = False  # recompute DiT blocks in the backward (memory for speed)
    # torch.compile each DiT block (text padded to a fixed length: one graph); auto = on CUDA only
    compile: Literal["auto", "none", "blocks"] = "auto"
    # steps whose inputs are read ahead on a thread: pays when reads stall (S3), costs GIL time otherwise
    prefetch: int = Field(0, ge=0)
    # attention and MLP projections in FP8 (e4m3/e5m2, per-tensor scales) where the GPU has it; compare the
    # loss curve with a bf16 run before trusting it (plain matmuls elsewhere: the same numbers)
    fp8_matmuls: bool = False
    # where the EMA weights live: auto = on the GPU beside unsharded weights when the memory left holds them
    ema_device: Literal["auto", "host", "device"] = "auto"

    def lr_factor(self, step: int) -> float:
        """The LR multiplier after `step` optimizer steps: a linear warm-up to 1, then the schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        done = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))

    @model_validator(mode="after")
    def _check(self) -> Stage:
        if not self.name.strip("."):  # '.' or '..' would name the parent of the stage's output directory
            raise ValueError(f"stage name '{self.name}' must not be only dots")
        if self.init_from == self.name:
            raise ValueError(f"stage '{self.name}': init_from names the stage itself")
        return self


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 42
    stages: list[Stage]

    @model_validator(mode="after")
    def _names(self) -> TrainParams:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        for s in self.stages:
            if s.init_from and "/" not in s.init_from and s.init_from not in names:
                raise ValueError(f"stage '{s.name}': init_from '{s.init_from}' is neither a stage nor a path")
        return self

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"unknown stage '{name}' (declared: {', '.join(s.name for s in self.stages)})")


def load_train_params(path: str | Path, section: str = "train") -> TrainParams:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"params file not found: {p}")
    data = read_yaml(p, "params file") or {}
    for part in section.split("."):
        if not isinstance(data, dict) or part not in data:
            raise UserError(f"{p}: no '{section}' section")
        data = data[part]
    if not isinstance(data, dict):
        raise UserError(f"{p}: section '{section}' must be a mapping")
    return TrainParams.model_validate(data)
