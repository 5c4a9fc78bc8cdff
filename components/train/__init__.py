"""The train step: one fine-tuning stage (`fusedit train`): config, loop, checkpoints, EMA, export,
and the distributed / XLA set-up."""

PUBLIC = ("config",)  # a stage's settings, which the ablation spec validates
