"""What every suite gets (a context) and returns (a result); suites are modules with prepare() and score()."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusedit.components.evaluate.evals.sampling import Sampler


@dataclass
class SuiteContext:
    cfg: Any  # fusedit.components.evaluate.config.EvalConfig
    sampler: Sampler
    root: Path  # the run's output directory
    main: bool = True  # rank 0: writes shared files and scores

    def samples(self, suite: str) -> Path:
        return self.root / "samples" / suite


@dataclass
class SuiteResult:
    metrics: dict[str, float]
    bars: dict[str, float] = field(default_factory=dict)  # per-category values in [0, 1] for the report
    grids: dict[str, list[Path]] = field(default_factory=dict)  # title -> sample images for the report
    notes: list[str] = field(default_factory=list)
