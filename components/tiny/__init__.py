"""The tiny step: the tiny local checkpoints the `tiny` recipe trains on (the DVC `tiny` stage runs
`fusedit model init-tiny`, i.e. fusedit.model.tiny); here only its KFP component."""

PUBLIC = ()  # nothing reads it but the pipelines
