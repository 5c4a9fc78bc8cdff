"""Pipeline steps: one typed function per step, shared by the CLI, DVC and KFP."""
