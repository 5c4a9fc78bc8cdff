"""The evaluation pod's side of the suites' inputs: the run parameters' values on top of the eval config.

`evaluate_op` (components/evaluate/component.py) calls `pod_fields` in its pod; the run parameters themselves,
and the checks at compile and submit time, are the pipelines' (pipelines/eval_inputs.py). Kept free of kfp
imports: the KFP executor imports it while kfp itself is still being imported.
"""
from __future__ import annotations

from pathlib import Path

from fusedit.errors import UserError


def pod_fields(fields: dict, values: dict[str, str], workdir: str) -> dict:
    """The evaluation config `fields` with the run parameters' non-empty values on top; Inception weights given
    as s3:// or http(s):// are fetched into `workdir` (the fid suite loads them from a local file)."""
    out = dict(fields)
    for name, value in values.items():
        if value:
            out[name] = value
    weights = out.get("fid_weights")
    if isinstance(weights, str) and weights.startswith(("s3://", "https://", "http://")):
        out["fid_weights"] = _fetch(weights, Path(workdir))
    return out


def _fetch(uri: str, workdir: Path) -> str:
    """Copy `uri` (s3:// or http(s)://) into `workdir`; the local path."""
    import shutil
    import urllib.request

    from fusedit.components.shared import storage

    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / (uri.rstrip("/").rsplit("/", 1)[-1] or "weights")
    try:
        with (storage.open_read(uri) if storage.is_s3(uri) else urllib.request.urlopen(uri, timeout=120)) as src, \
                open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except OSError as exc:
        raise UserError(f"fid_weights {uri}: cannot fetch ({exc})") from None
    return str(target)
