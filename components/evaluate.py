"""The evaluation step: sample every suite's prompts from an exported pipeline, score, report.

`evaluate(EvalConfig) -> EvalResult` is what `fusedit eval run`, the DVC stage and the KFP component
call. Sampling is the reference protocol (Euler flow, 25 steps, guidance 6, empty unconditional
caption, fixed per-prompt seeds); under torchrun each rank samples its slice of every suite, then
rank 0 scores. `samples/settings.json` records what the images were drawn with, so a rerun resumes
only when the settings and the pipeline are the same, and says so otherwise.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fusedit.components import storage
from fusedit.components.distributed import parse_device
from fusedit.components.evals import following, suite
from fusedit.components.evals.base import SuiteContext, SuiteResult
from fusedit.components.evals.sampling import Sampler, dist_env
from fusedit.errors import UserError, read_yaml

SAMPLING_KEYS = ("steps", "guidance", "seed", "resolution", "images_per_prompt", "synthetic_per_category",
                 "synthetic_seed", "limit", "dtype")


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
    images_per_prompt: int = Field(4, ge=1)
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


@dataclass
class EvalResult:
    output: Path
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    sampling: dict[str, dict[str, int]] = field(default_factory=dict)
    report: Path | None = None
    seconds: float = 0.0


def local_pipeline(uri: str, cache: Path) -> Path:
    """The pipeline as a local directory (an s3:// prefix is downloaded once under `cache`)."""
    if storage.is_s3(uri):
        dest = cache / hashlib.sha1(uri.encode()).hexdigest()[:12]
        if not (dest / "model_index.json").is_file():
            prefix = uri.rstrip("/") + "/"
            for obj in storage.list_uris(prefix):
                target = dest / obj[len(prefix):]
                if not target.resolve().is_relative_to(dest.resolve()):  # a key with '..' or a leading '/'
                    raise UserError(f"--pipeline {uri}: object {obj!r} would be written outside {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(obj))
        path = dest
    else:
        path = Path(uri)
    if not (path / "model_index.json").is_file():
        raise UserError(f"--pipeline {uri}: not an exported pipeline (no model_index.json); "
                        "pass e.g. data/train/joint/pipeline")
    return path


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of the pipeline's files (cheap, changes when it is rewritten)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_pipeline(path: Path, device: torch.device, dtype: torch.dtype):
    from fusedit.model.pipeline import FuseDiTPipeline

    try:
        pipe = FuseDiTPipeline.from_pretrained(str(path), dtype=dtype, use_safetensors=True)  # never unpickle
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"--pipeline {path}: cannot load ({type(exc).__name__}: {exc})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_settings(samples: Path, settings: dict[str, Any], overwrite: bool, main: bool) -> None:
    f = samples / "settings.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if not overwrite:
                raise UserError(f"{samples}: images were drawn with other settings ({', '.join(diff)} differ); "
                                "use another --output or pass --overwrite to discard them")
            if main:
                shutil.rmtree(samples)
    if main:
        samples.mkdir(parents=True, exist_ok=True)
        storage.write_json(str(f), settings)  # atomic: a killed run never leaves half a settings file


def _barrier(world: int, device: torch.device) -> None:
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist.barrier()


def evaluate(config: EvalConfig) -> EvalResult:
    """Sample (resumably, this rank's share) and, on rank 0, score every suite and write the report."""
    t0 = time.time()
    mods = {name: suite(name) for name in dict.fromkeys(config.suites)}
    rank, world, local = dist_env()
    main = rank == 0
    root = Path(config.output)
    path = local_pipeline(config.pipeline, root / ".pipeline")
    device = parse_device(config.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(path, device, _dtype(config.dtype, device))
    sampler = Sampler(pipe, config.steps, config.guidance, config.batch_size, config.resolution, rank, world,
                      config.progress and main)
    settings = {k: getattr(config, k) for k in SAMPLING_KEYS} | {
        "pipeline": fingerprint(path), "size": sampler.size}
    _check_settings(root / "samples", settings, config.overwrite, main)
    if world > 1:
        _barrier(world, device)  # rank 0 may have cleared samples/
    ctx = SuiteContext(config, sampler, root, main)
    result = EvalResult(root)
    prompts: list[str] = []
    for name, mod in mods.items():
        jobs = mod.prepare(ctx)
        prompts += [j.prompt for j in jobs]
        result.sampling[name] = sampler.run(jobs, desc=name)
    _barrier(world, device)
    if not main:
        return result
    scored: dict[str, SuiteResult] = {}
    for name, mod in mods.items():
        scored[name] = mod.score(ctx)
        result.metrics[name] = {k: float(v) for k, v in scored[name].metrics.items()}
    result.metrics["prompt_following"] = following.measure(sampler, prompts, config.seed)
    result.seconds = round(time.time() - t0, 2)
    storage.write_json(str(root / "metrics.json"), result.metrics)
    from fusedit.components.evals.report import write_report

    result.report = write_report(root, result.metrics, scored, settings | {"pipeline_path": config.pipeline})
    return result


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
