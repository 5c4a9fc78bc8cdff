"""How an ablation's runs are compared: intervals over seeds, and whether a paper's claim is reproduced.

`spread` is a variant's mean with its 95% t-interval over seeds; `delta` is variant - reference with a
paired t-interval over the seeds both ran (else Welch's). A claim compares a variant with the spec's
reference on one metric: `higher` or `lower` (the paper found a difference), or `not_worse` (the paper
found that a change costs nothing, e.g. dropping the timestep input). Its verdict reads that interval:

    higher     reproduced: lo > 0          contradicted: hi < 0
    lower      reproduced: hi < 0          contradicted: lo > 0
    not_worse  reproduced: lo > -margin    contradicted: hi < -margin   (a non-inferiority test)

and anything else, or a single seed (no interval), is `not resolved`: the runs cannot tell at this scale.
"""
from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _t(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def delta(ref: dict[int, float], var: dict[int, float]) -> dict[str, Any]:
    """Mean difference variant - reference with a 95% t-interval: paired over shared seeds, else Welch."""
    d = mean(var.values()) - mean(ref.values())
    shared = sorted(set(ref) & set(var))
    if len(shared) >= 2:
        diffs = [var[s] - ref[s] for s in shared]
        dm, sd = mean(diffs), stdev(diffs)
        half = _t(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        return {"delta": dm, "lo": dm - half, "hi": dm + half, "n": len(diffs), "method": "paired t"}
    if len(ref) >= 2 and len(var) >= 2:
        va, vb = stdev(var.values()) ** 2 / len(var), stdev(ref.values()) ** 2 / len(ref)
        se = math.sqrt(va + vb)
        if se == 0:
            return {"delta": d, "lo": d, "hi": d, "n": min(len(ref), len(var)), "method": "welch t"}
        df = (va + vb) ** 2 / (va ** 2 / (len(var) - 1) + vb ** 2 / (len(ref) - 1))
        half = _t(max(1, round(df))) * se
        return {"delta": d, "lo": d - half, "hi": d + half, "n": min(len(ref), len(var)), "method": "welch t"}
    return {"delta": d, "lo": None, "hi": None, "n": 1, "method": "single seed"}


def spread(values: dict[int, float]) -> dict[str, Any]:
    """Mean, sd and the 95% t-interval of the mean over seeds (no interval from one seed)."""
    m, n = mean(values.values()), len(values)
    sd = stdev(values.values()) if n > 1 else 0.0
    half = _t(n - 1) * sd / math.sqrt(n) if n > 1 else None
    return {"mean": m, "sd": sd, "lo": None if half is None else m - half, "hi": None if half is None else m + half,
            "n": n, "values": {str(a): b for a, b in sorted(values.items())}}


REPRODUCED, CONTRADICTED, UNRESOLVED = "reproduced", "contradicted", "not resolved"


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expect: Literal["higher", "lower", "not_worse"]  # the variant against the reference, as the paper found
    metric: str = "synthetic/overall"  # a key of the ablation report (`suite/name`, `train/<stage>/final_loss`)
    margin: float = Field(0.0, ge=0.0)  # not_worse: the largest drop that still counts as no worse
    source: str = ""  # where the paper says it

    def describe(self) -> str:
        what = {"higher": "higher than", "lower": "lower than", "not_worse": "no worse than"}[self.expect]
        tol = f" (margin {self.margin:g})" if self.expect == "not_worse" else ""
        return f"{self.metric} {what} the reference{tol}"


def verdict(claim: Claim, d: dict[str, Any] | None) -> str:
    """`reproduced`, `contradicted` or `not resolved` for a claim, given the report's delta on its metric."""
    if not d or d.get("lo") is None:
        return UNRESOLVED
    lo, hi = d["lo"], d["hi"]
    if claim.expect == "lower":
        lo, hi = -hi, -lo  # a drop is the claimed direction
    edge = -claim.margin if claim.expect == "not_worse" else 0.0
    if lo > edge:
        return REPRODUCED
    if hi < edge:
        return CONTRADICTED
    return UNRESOLVED
