"""The data-quality suite (Great Expectations 1.x) over the filter's stats, plus the HTML report.

Per-sample checks live in the filter; this suite states what the *output* must look like (kept
rows within the configured ranges, unique keys, captions present) and what the *batch* may cost
(reject / duplicate / decode-failure rates as `mostly` thresholds). It runs through a checkpoint,
keeps the validation JSON and builds Data Docs under `report/gx/`. GX is imported lazily (3-4 s).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from fusedit.components.data.filter_config import FilterConfig

log = logging.getLogger(__name__)
DOCS_INDEX = "gx/uncommitted/data_docs/local_site/index.html"
KEPT_ONLY = "kept_only"


@dataclass
class QualityResult:
    success: bool
    failed: list[str]  # one short line per failed expectation
    evaluated: int
    checks: list[dict[str, Any]] = field(default_factory=list)  # name, expectation, success, observed
    docs_index: str | None = None  # relative to the report directory


def expectation_specs(cfg: FilterConfig, has_tokens: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(readable name, GX expectation class, kwargs) for every check of the suite."""
    q = cfg.quality
    kept = {KEPT_ONLY: True}  # becomes a GX row condition decision == "kept"
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("at least one input sample", "ExpectTableRowCountToBeBetween", {"min_value": 1}),
        ("every row has a key", "ExpectColumnValuesToNotBeNull", {"column": "key"}),
        ("decision is kept or rejected", "ExpectColumnValuesToBeInSet",
         {"column": "decision", "value_set": ["kept", "rejected"]}),
        ("kept keys are unique", "ExpectColumnValuesToBeUnique", {"column": "key", **kept}),
        ("kept captions are present", "ExpectColumnValuesToNotBeNull", {"column": "caption", **kept}),
        (f"kept caption length in [1, {cfg.max_caption_chars}] chars", "ExpectColumnValuesToBeBetween",
         {"column": "caption_chars", "min_value": 1, "max_value": cfg.max_caption_chars, **kept}),
        (f"kept width >= {cfg.min_side}", "ExpectColumnValuesToBeBetween",
         {"column": "width", "min_value": cfg.min_side, **kept}),
        (f"kept height >= {cfg.min_side}", "ExpectColumnValuesToBeBetween",
         {"column": "height", "min_value": cfg.min_side, **kept}),
        (f"kept aspect in [{cfg.min_aspect}, {cfg.max_aspect}]", "ExpectColumnValuesToBeBetween",
         {"column": "aspect", "min_value": cfg.min_aspect, "max_value": cfg.max_aspect, **kept}),
        (f"reject rate <= {q.max_reject_rate}", "ExpectColumnValuesToBeInSet",
         {"column": "decision", "value_set": ["kept"], "mostly": 1 - q.max_reject_rate}),
        (f"duplicate rate <= {q.max_duplicate_rate}", "ExpectColumnValuesToBeInSet",
         {"column": "is_duplicate", "value_set": [False], "mostly": 1 - q.max_duplicate_rate}),
        (f"decode-failure rate <= {q.max_decode_failure_rate}", "ExpectColumnValuesToBeInSet",
         {"column": "decode_failed", "value_set": [False], "mostly": 1 - q.max_decode_failure_rate}),
    ]
    if has_tokens:
        specs.append((f"kept caption tokens <= {cfg.max_caption_tokens}", "ExpectColumnValuesToBeBetween",
                      {"column": "caption_tokens", "min_value": 0, "max_value": cfg.max_caption_tokens,
                       **kept}))
    return specs


def _observed(res: Any) -> str:
    r = res.result or {}
    if "unexpected_percent" in r and r["unexpected_percent"] is not None:
        return f"{r['unexpected_percent']:.2f}% unexpected"
    if "observed_value" in r:
        return f"observed {r['observed_value']}"
    return ""


def validate(stats: Any, cfg: FilterConfig, report_dir: str) -> QualityResult:
    """Run the suite through a GX checkpoint in a file context at report_dir/gx; build Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)  # its import logs at INFO
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.row_conditions import Column

    ctx = gx.get_context(mode="file", project_root_dir=report_dir)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    ctx.variables.save()
    batch = ctx.data_sources.add_pandas("filter").add_dataframe_asset("stats") \
        .add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="filtered_shards"))
    has_tokens = bool(stats["caption_tokens"].notna().any()) if len(stats) else False
    names = []
    for name, cls, kwargs in expectation_specs(cfg, has_tokens):
        if kwargs.pop(KEPT_ONLY, False):
            kwargs["row_condition"] = Column("decision") == "kept"
        suite.add_expectation(getattr(gx.expectations, cls)(**kwargs, meta={"name": name}))
        names.append(name)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="stats", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="filter_quality", validation_definitions=[vd], result_format="SUMMARY",
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")]))
    frame = stats.drop(columns=["detail"], errors="ignore")
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    (vr,) = run.run_results.values()
    with open(os.path.join(report_dir, "validation.json"), "w") as f:
        json.dump(vr.to_json_dict(), f, indent=2, default=str)
    checks, failed = [], []
    for res in vr.results:
        conf = res.expectation_config
        name = (conf.meta or {}).get("name", conf.type)
        raised = (res.exception_info or {}).get("raised_exception")
        ok = bool(res.success) and not raised
        obs = _observed(res) if not raised else f"error: {res.exception_info.get('exception_message')}"
        checks.append({"name": name, "expectation": conf.type, "column": conf.kwargs.get("column"),
                       "success": ok, "observed": obs})
        if not ok:
            col = conf.kwargs.get("column")
            failed.append(f"{name} ({conf.type}{' on ' + col if col else ''}{', ' + obs if obs else ''})")
    docs = DOCS_INDEX if os.path.exists(os.path.join(report_dir, DOCS_INDEX)) else None
    return QualityResult(success=not failed, failed=failed, evaluated=len(checks), checks=checks,
                         docs_index=docs)


def run_quality(stats: Any, metrics: dict[str, Any], cfg: FilterConfig, report_dir: str,
                examples: dict[str, Any]) -> QualityResult:
    """Validate, then always write report/index.html (also when the suite fails)."""
    from fusedit.components.data.report import write_quality_report

    os.makedirs(report_dir, exist_ok=True)
    result = validate(stats, cfg, report_dir)
    write_quality_report(os.path.join(report_dir, "index.html"), metrics, stats, examples, result, cfg)
    return result
