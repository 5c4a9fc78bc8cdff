"""The ablate step: an experiment spec, the DVC-queue driver and the comparison report (`fusedit ablate`)."""

PUBLIC = ()  # nothing reads it but the CLI and the ablation pipeline
