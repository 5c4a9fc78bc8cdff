"""What the training tasks (components/train/component.py) do around `fusedit train`: their inputs, the job's
arguments, their outputs.

Kept free of kfp imports: the KFP executor imports this while kfp itself is still being imported.
"""

from pathlib import Path

import yaml


def location(artifact) -> str:
    """Where an artifact's data really is: the output a step recorded, an s3:// URI, or the local path."""
    return artifact.metadata.get("output") or (artifact.uri if artifact.uri.startswith("s3://") else artifact.path)


def stage_inputs(stage: str, params: str, data: str, cache, init, output_root: str, model) -> tuple[str, str, str]:
    """(data location, output location, params YAML text with `init_from` pointing at the upstream Model)."""
    import os

    from fusedit.components.shared import storage

    data = data or location(cache)
    target = storage.join(output_root, stage) if output_root else location(model)
    doc = yaml.safe_load(Path(params).read_text() if "\n" not in params and os.path.isfile(params) else params)
    if init is not None:
        for s in doc["train"]["stages"]:
            if s["name"] == stage:
                s["init_from"] = location(init)
    return data, target, yaml.safe_dump(doc, sort_keys=False)


def train_args(recipe: str, stage: str, data: str, target: str, overrides: list, device: str) -> list[str]:
    """The arguments after `fusedit train` (without --params)."""
    args = ["--recipe", recipe, "--stage", stage, "--data", data, "--output", target]
    return args + [a for o in overrides for a in ("--set", o)] + (["--device", device] if device else [])


def record(model, metrics, target: str, output_root: str, stage: str, recipe: str, data_version: str) -> None:
    """Fill the Model artifact and the Metrics from the stage's metrics.json (whoever ran the stage)."""
    import json

    from fusedit.components.shared import storage

    r = json.loads(storage.read_bytes(storage.join(target, "metrics.json")))
    model.metadata.update({"output": target, "pipeline": storage.join(target, "pipeline"), "stage": stage,
                           "recipe": recipe, "steps": r["steps"], "data_version": data_version})
    if output_root:
        model.uri = target
    for key in ("final_loss", "steps"):
        metrics.log_metric(key, r[key])
    timing = json.loads(storage.read_bytes(storage.join(target, "timing.json")))
    metrics.log_metric("images_per_s", timing["images_per_s"])
