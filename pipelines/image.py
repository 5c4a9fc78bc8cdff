"""The one container image every KFP component runs on (the project installed, CLI on PATH)."""
IMAGE = "ghcr.io/fusedit/fusedit:0.1.0"
# The torch-xla image (docker/Dockerfile.tpu: torch 2.9.1 + torch-xla[tpu] 2.9.0) for the TPU training
# steps; same tag as IMAGE, built from the same commit.
TPU_IMAGE = "ghcr.io/fusedit/fusedit-tpu:0.1.0"
