"""The evaluate step: sample an exported pipeline, score the suites, report (`fusedit eval`)."""

PUBLIC = ("config", "evals.report")  # its settings and its metrics' flattening, read by the ablation step
