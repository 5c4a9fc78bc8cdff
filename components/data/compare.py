"""`fusedit data compare`: what changed between two versions of the filtered data, and a gate on it.

A side is a filter output: a directory or s3:// prefix, or the filter stage's output at a git
revision of the DVC repository (read through `dvc.api.DVCFileSystem`, from the DVC cache or remote).
From each side: `metrics.json` (counts, reject reasons), `stats.parquet` (one row per input sample)
and `report/validation.json` (the Great Expectations results, when the report was on).

The differences: sample counts; reject rate per reason; duplicate and decode-failure rates; per
numeric column of the kept samples a two-sample Kolmogorov-Smirnov statistic D with the threshold
used (the larger of a minimum effect and the critical value at `ks_alpha`); expectations that
changed status. The gate (`CompareGate`) turns the ones that got worse into violations.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fusedit.components.shared import storage
from fusedit.errors import UserError, read_yaml

RATES = ("reject_rate", "duplicate_rate", "decode_failure_rate")
COLUMNS = ["width", "height", "aspect", "image_bytes", "caption_chars", "caption_tokens"]


class CompareGate(BaseModel):
    """Worst acceptable change from OLD to NEW (rates are fractions of input samples, increases absolute)."""

    model_config = ConfigDict(extra="forbid")
    max_reject_rate_increase: float = Field(0.02, ge=0, le=1)
    max_reason_rate_increase: float = Field(0.01, ge=0, le=1)  # any single reject reason
    max_duplicate_rate_increase: float = Field(0.01, ge=0, le=1)
    max_decode_failure_rate_increase: float = Field(0.01, ge=0, le=1)
    max_kept_drop: float | None = Field(None, ge=0, le=1)  # relative drop of kept samples; None: not gated
    fail_on_shift: bool = True  # a shifted distribution of the kept samples fails the gate
    fail_on_expectation_regression: bool = True  # an expectation that passed and now fails


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    columns: list[str] = COLUMNS  # numeric stats columns compared over kept samples (absent ones skipped)
    ks_alpha: float = Field(0.001, gt=0, lt=1)  # significance of the KS critical value
    ks_min_effect: float = Field(0.1, ge=0, le=1)  # and the smallest D that counts as a shift
    gate: CompareGate = CompareGate()
    # what the DVC stage (`fusedit data compare --from-config`) compares data/filtered against: the filter
    # output the last model was trained on, as a path / s3:// prefix, or data/filtered at a git revision
    baseline: str | None = None
    baseline_rev: str | None = None


def load_compare_config(path: str | None = None, section: str | None = None) -> CompareConfig:
    """Defaults <- a YAML file (optionally one dotted section of it, e.g. data.compare)."""
    data: Any = (read_yaml(path, "config file") or {}) if path else {}
    for part in (section.split(".") if path and section else []):
        if not isinstance(data, dict) or part not in data:
            raise UserError(f"config file {path} has no section {section!r}")
        data = data[part]
    if not isinstance(data, dict):
        raise UserError(f"config {path}{':' + section if section else ''} must be a mapping")
    return CompareConfig.model_validate(data)


# ---------------------------------------------------------------- reading one side

@dataclass
class Side:
    label: str
    metrics: dict[str, Any]
    stats: Any  # pandas DataFrame
    checks: list[dict[str, Any]] = field(default_factory=list)  # from validation.json; empty: no report


def _reader(where: str, rev: str | None, repo: str | None):
    """name -> bytes (None when missing) for a filter output at `where` (at `rev` of a DVC repo)."""
    if rev is None:
        def read_plain(name: str) -> bytes | None:
            uri = storage.join(where, name)
            return storage.read_bytes(uri) if storage.exists(uri) else None
        return read_plain
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(repo or ".", rev=rev)
        found = fs.isdir(where.strip("/"))  # the repository opens lazily: its errors surface here
    except Exception as exc:  # noqa: BLE001 - not a repo, unknown revision: the user's input
        raise UserError(f"cannot open revision {rev!r} of the DVC repository {repo or '.'}: "
                        f"{type(exc).__name__}: {exc}") from None
    if not found:
        raise UserError(f"{where}@{rev}: no such directory in the DVC repository {repo or '.'}")

    def read_dvc(name: str) -> bytes | None:
        path = f"{where.strip('/')}/{name}"
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - e.g. data not in the cache or remote
            raise UserError(f"{path}@{rev}: cannot be read through DVC ({type(exc).__name__}: {exc}); "
                            f"is it in the cache (dvc fetch / dvc pull)?") from None
    return read_dvc


def _checks(validation: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in validation.get("results", []):
        conf = r.get("expectation_config", {})
        kw = conf.get("kwargs", {})
        raised = (r.get("exception_info") or {}).get("raised_exception")
        out.append({"name": (conf.get("meta") or {}).get("name", conf.get("type")), "type": conf.get("type"),
                    "identity": json.dumps([conf.get("type"), kw.get("column"), kw.get("value_set"),
                                            bool(kw.get("row_condition"))], default=str),
                    "success": bool(r.get("success")) and not raised})
    return out


def load_side(where: str, rev: str | None = None, repo: str | None = None) -> Side:
    """Read one filter output; a missing metrics.json or stats.parquet is a UserError naming it."""
    import pandas as pd

    label = f"{where}@{rev}" if rev else where
    read = _reader(where, rev, repo)
    raw = {name: read(name) for name in ("metrics.json", "stats.parquet")}
    for name, blob in raw.items():
        if blob is None:
            raise UserError(f"{label}: no {name} (not a filter output of `fusedit data filter`?)")
    try:
        metrics = json.loads(raw["metrics.json"])
        stats = pd.read_parquet(io.BytesIO(raw["stats.parquet"]))
    except (ValueError, OSError) as exc:
        raise UserError(f"{label}: unreadable filter output ({type(exc).__name__}: {exc})") from None
    validation = read("report/validation.json")
    checks = _checks(json.loads(validation)) if validation else []
    return Side(label, metrics, stats, checks)


# ---------------------------------------------------------------- the differences

def ks_2samp(a: Any, b: Any) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (ties handled exactly)."""
    import numpy as np

    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    pooled = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, pooled, "right") / a.size
                            - np.searchsorted(b, pooled, "right") / b.size)))
    ne = a.size * b.size / (a.size + b.size)
    lam = (math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, (min(1.0, max(0.0, p)) if lam > 0 else 1.0)


def ks_critical(n: int, m: int, alpha: float) -> float:
    """The D above which two samples of sizes n, m differ at significance alpha (asymptotic)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _shift(column: str, a: Any, b: Any, cfg: CompareConfig) -> dict[str, Any]:
    import numpy as np

    d, p = ks_2samp(a, b)
    threshold = max(cfg.ks_min_effect, ks_critical(a.size, b.size, cfg.ks_alpha))
    return {"column": column, "n_old": int(a.size), "n_new": int(b.size),
            "median_old": round(float(np.median(a)), 4), "median_new": round(float(np.median(b)), 4),
            "ks": round(d, 4), "p_value": float(f"{p:.4g}"), "threshold": round(threshold, 4),
            "shifted": d > threshold}


def distribution_shifts(old: Side, new: Side, cfg: CompareConfig) -> list[dict[str, Any]]:
    out = []
    for col in cfg.columns:
        if col not in old.stats.columns or col not in new.stats.columns:
            continue
        a, b = (kept_values(s, col) for s in (old, new))
        if a.size and b.size:
            out.append(_shift(col, a, b, cfg))
    return out


def kept_values(side: Side, column: str) -> Any:
    kept = side.stats[side.stats["decision"] == "kept"][column]
    return kept.dropna().astype(float).to_numpy()


def expectation_changes(old: Side, new: Side) -> list[dict[str, Any]]:
    """Expectations whose status differs, paired by name, else by what they check (a changed threshold)."""
    def index(checks: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
        seen: dict[str, int] = {}
        for c in checks:
            seen[c[key]] = seen.get(c[key], 0) + 1
        return {c[key]: c for c in checks if seen[c[key]] == 1}

    pairs, rest_old, rest_new = [], list(old.checks), list(new.checks)
    for key in ("name", "identity"):
        o, n = index(rest_old, key), index(rest_new, key)
        for k in [k for k in o if k in n]:
            pairs.append((o[k], n[k]))
            rest_old.remove(o[k])
            rest_new.remove(n[k])
    changes = [{"old_name": a["name"], "new_name": b["name"], "old": a["success"], "new": b["success"]}
               for a, b in pairs if a["success"] != b["success"]]
    changes += [{"old_name": a["name"], "new_name": None, "old": a["success"], "new": None} for a in rest_old]
    changes += [{"old_name": None, "new_name": b["name"], "old": None, "new": b["success"]} for b in rest_new]
    return changes


def _rate_row(old_n: int, new_n: int, old_total: int, new_total: int) -> dict[str, Any]:
    ro, rn = (old_n / old_total if old_total else 0.0), (new_n / new_total if new_total else 0.0)
    return {"old": old_n, "new": new_n, "old_rate": round(ro, 6), "new_rate": round(rn, 6),
            "delta": round(rn - ro, 6)}


def _counts(mo: dict[str, Any], mn: dict[str, Any]) -> dict[str, Any]:
    return {k: {"old": mo.get(k), "new": mn.get(k), "delta": mn.get(k, 0) - mo.get(k, 0)}
            for k in ("n_in", "n_kept", "n_rejected", "n_bad_shards", "n_shards_in")}


def _violations(diff: dict[str, Any], gate: CompareGate) -> list[str]:
    out = []

    def pts(x: float) -> str:
        return f"{100 * x:+.2f} points"

    limits = {"reject_rate": gate.max_reject_rate_increase, "duplicate_rate": gate.max_duplicate_rate_increase,
              "decode_failure_rate": gate.max_decode_failure_rate_increase}
    for name, limit in limits.items():
        r = diff["rates"][name]
        if r["delta"] > limit + 1e-12:
            out.append(f"{name.replace('_', ' ')} {100 * r['old']:.2f}% -> {100 * r['new']:.2f}% "
                       f"({pts(r['delta'])} > {pts(limit)})")
    for reason, r in diff["reasons"].items():
        if r["delta"] > gate.max_reason_rate_increase + 1e-12:
            out.append(f"{reason} rate {100 * r['old_rate']:.2f}% -> {100 * r['new_rate']:.2f}% "
                       f"({pts(r['delta'])} > {pts(gate.max_reason_rate_increase)})")
    kept = diff["counts"]["n_kept"]
    if gate.max_kept_drop is not None and kept["old"]:
        drop = (kept["old"] - kept["new"]) / kept["old"]
        if drop > gate.max_kept_drop:
            out.append(f"kept samples {kept['old']} -> {kept['new']} "
                       f"(-{100 * drop:.1f}% > -{100 * gate.max_kept_drop:g}%)")
    if gate.fail_on_shift:
        out += [f"{s['column']} of kept samples shifted (KS D {s['ks']:.3f} > {s['threshold']:.3f}; median "
                f"{s['median_old']:g} -> {s['median_new']:g})" for s in diff["shifts"] if s["shifted"]]
    if gate.fail_on_expectation_regression:
        out += [f"expectation '{c['new_name']}' now fails" + (f" (was '{c['old_name']}', passing)"
                if c["old_name"] != c["new_name"] else " (passed before)")
                for c in diff["expectations"] if c["old"] is True and c["new"] is False]
    return out


def compare(old: Side, new: Side, cfg: CompareConfig) -> dict[str, Any]:
    """The differences OLD -> NEW and the gate's verdict, as one JSON-able dict (no timestamps)."""
    mo, mn = old.metrics, new.metrics
    reasons = sorted(set(mo.get("reasons", {})) | set(mn.get("reasons", {})))
    diff: dict[str, Any] = {
        "old": old.label, "new": new.label, "counts": _counts(mo, mn),
        "rates": {k: {"old": mo.get(k, 0.0), "new": mn.get(k, 0.0), "delta": round(mn.get(k, 0.0) - mo.get(k, 0.0), 6)}
                  for k in RATES},
        "reasons": {r: _rate_row(mo.get("reasons", {}).get(r, 0), mn.get("reasons", {}).get(r, 0),
                                 mo["n_in"], mn["n_in"]) for r in reasons
                    if mo.get("reasons", {}).get(r, 0) or mn.get("reasons", {}).get(r, 0)},
        "shifts": distribution_shifts(old, new, cfg),
        "shift_test": {"statistic": "two-sample Kolmogorov-Smirnov D over kept samples",
                       "threshold": f"max({cfg.ks_min_effect}, critical value at alpha={cfg.ks_alpha})"},
        "expectations": expectation_changes(old, new),
        "expectations_compared": bool(old.checks and new.checks),
    }
    violations = _violations(diff, cfg.gate)
    diff["gate"] = {"passed": not violations, "violations": violations, "config": cfg.gate.model_dump()}
    return diff
