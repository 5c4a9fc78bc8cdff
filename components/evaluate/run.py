"""The evaluation step: sample every suite's prompts from an exported pipeline, score, report.

`evaluate(EvalConfig) -> EvalResult` is what `fusedit eval run`, the DVC stage and the KFP component
call. Sampling is the reference protocol (Euler flow, 25 steps, guidance 6, empty unconditional
caption, fixed per-prompt seeds, the benchmarks' own images per prompt); under torchrun each rank
samples its slice of every suite, then rank 0 scores. A rerun into the same output resumes: images
drawn with other sampler settings or weights are refused (or discarded with `overwrite`), images drawn
for another prompt, seed or image count are drawn again (components/evaluate/evals/resume.py).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.evals import following, resume, suite
from fusedit.components.evaluate.evals.base import SuiteContext, SuiteResult
from fusedit.components.evaluate.evals.sampling import Sampler, dist_env
from fusedit.components.shared import storage
from fusedit.components.shared.device import parse_device
from fusedit.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    output: Path
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    sampling: dict[str, dict[str, int]] = field(default_factory=dict)
    report: Path | None = None
    seconds: float = 0.0
    prompts: list[str] = field(default_factory=list)  # every prompt sampled, in suite order


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


def _barrier(world: int, device: torch.device) -> None:
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist.barrier()


def _sample(ctx: SuiteContext, mods: dict, world: int, device: torch.device, result: EvalResult) -> dict[str, str]:
    """Every suite's jobs: stale images deleted (rank 0), this rank's unfinished share drawn. Prompt digests."""
    jobs = {name: mod.prepare(ctx) for name, mod in mods.items()}
    gone = resume.reconcile(ctx.root / "samples", jobs) if ctx.main else {}
    _barrier(world, device)  # nobody draws before rank 0 has deleted what is stale
    for name, suite_jobs in jobs.items():
        counts = gone.get(name, {"stale": 0, "dropped": 0})
        if counts["stale"] or counts["dropped"]:
            log.warning("%s: images of %d prompts were drawn for another prompt, seed or image count (drawing "
                        "them again); images of %d prompts no longer in the suite deleted", name, counts["stale"],
                        counts["dropped"])
        result.sampling[name] = ctx.sampler.run(suite_jobs, desc=name) | counts
    result.prompts = [j.prompt for suite_jobs in jobs.values() for j in suite_jobs]
    return {name: resume.digest(suite_jobs) for name, suite_jobs in jobs.items()}


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
    settings = {"steps": config.steps, "guidance": config.guidance, "size": sampler.size,
                "dtype": str(pipe.transformer.dtype).removeprefix("torch."), "pipeline": resume.content_hash(path)}
    resume.check_settings(root / "samples", settings, config.overwrite, main)
    _barrier(world, device)  # rank 0 may have cleared samples/
    ctx = SuiteContext(config, sampler, root, main)
    result = EvalResult(root)
    digests = _sample(ctx, mods, world, device, result)
    if not main:
        return result
    scored: dict[str, SuiteResult] = {}
    for name, mod in mods.items():
        scored[name] = mod.score(ctx)
        result.metrics[name] = {k: float(v) for k, v in scored[name].metrics.items()}
        result.metrics[name]["images_per_prompt"] = float(config.images_for(name))
    result.metrics["prompt_following"] = following.measure(sampler, result.prompts, config.seed)
    result.seconds = round(time.time() - t0, 2)
    storage.write_json(str(root / "metrics.json"), result.metrics)
    from fusedit.components.evaluate.evals.report import write_eval_report

    result.report = write_eval_report(root, result.metrics, scored, settings | {
        "pipeline_path": config.pipeline, "seed": config.seed, "prompts_sha256": digests})
    return result
