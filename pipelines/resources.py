"""CPU and memory requests of every pipeline step, and the image references the steps run.

Each KFP task (and each pod of a multi-node training job) requests the CPU and memory of its step, so the
scheduler places it on a node that has them and a neighbour cannot squeeze it out of memory. The defaults
below fit the nodes of the overlays (an a3-highgpu / p5 GPU node, a TPU v5e / v5p host); `--resources
STEP=CPU,MEMORY` at compile time overrides a step (either part may be left empty to keep its default).

Kept free of kfp imports, like components/train/task.py.
"""
from __future__ import annotations

import re

from fusedit.errors import UserError

# step -> (cpu, memory) requested by its pod
DEFAULTS: dict[str, tuple[str, str]] = {
    "synth": ("1", "2Gi"),
    "filter": ("4", "16Gi"),          # image decoding, perceptual hashes, the quality report
    "tiny": ("1", "4Gi"),
    "cache": ("8", "32Gi"),           # the frozen LLM and VAE in host memory while they move to the GPU
    "train": ("8", "64Gi"),           # the training task, or each pod of a multi-node job (per node / host)
    "train-launcher": ("500m", "1Gi"),  # the task that creates a multi-node job and follows its logs
    "evaluate": ("8", "32Gi"),
    "paths": ("100m", "256Mi"),       # the ablation's run-root helpers
    "run-result": ("1", "4Gi"),
    "compare": ("1", "4Gi"),
}
CPU = re.compile(r"^(\d+m|\d+(\.\d{1,3})?)$")  # what KFP and Kubernetes accept for a CPU quantity
MEMORY = re.compile(r"^\d+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")
# name[:tag][@sha256:<64 hex>], with an optional registry host[:port] (the distribution reference grammar)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE = re.compile(rf"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
                   r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


def parse(items: list[str]) -> dict[str, dict[str, str]]:
    """`STEP=CPU,MEMORY` items (either part may be empty) -> {step: {"cpu": ..., "memory": ...}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        step, sep, value = item.partition("=")
        cpu, comma, memory = value.partition(",")
        if not sep or not comma:
            raise UserError(f"--resources must be STEP=CPU,MEMORY, e.g. train=16,128Gi (got {item!r})")
        out[step.strip()] = {k: v.strip() for k, v in (("cpu", cpu), ("memory", memory)) if v.strip()}
    check(out)
    return out


def check(overrides: object) -> None:
    """Refuse an unknown step or a quantity Kubernetes would reject, naming the field."""
    if not isinstance(overrides, dict):
        raise UserError(f"resources must be a mapping of step to cpu/memory (got {overrides!r})")
    for step, value in overrides.items():
        if step not in DEFAULTS:
            raise UserError(f"resources: unknown step {step!r} (one of {', '.join(DEFAULTS)})")
        if not isinstance(value, dict) or not set(value) <= {"cpu", "memory"}:
            raise UserError(f"resources.{step} must set cpu and/or memory (got {value!r})")
        for key, pattern, example in (("cpu", CPU, "8 or 500m"), ("memory", MEMORY, "64Gi")):
            v = value.get(key)
            if v is not None and (not isinstance(v, str) or not pattern.match(v) or not re.search(r"[1-9]", v)):
                raise UserError(f"resources.{step}.{key} must be a positive Kubernetes quantity such as "
                                f"{example} (got {v!r})")


def requests(step: str, overrides: dict | None = None) -> tuple[str, str]:
    """(cpu, memory) of `step`: its default, with the compile-time override on top."""
    cpu, memory = DEFAULTS[step]
    o = (overrides or {}).get(step, {})
    return o.get("cpu", cpu), o.get("memory", memory)


def check_image(field: str, value: object) -> None:
    if not isinstance(value, str) or not IMAGE.match(value):
        raise UserError(f"{field} must be an image reference name[:tag][@sha256:<64 hex digits>], "
                        f"e.g. ghcr.io/fusedit/fusedit:0.1.0 (got {value!r})")
