"""The one container image every KFP component runs on (the project installed, CLI on PATH).

The defaults are tags; `--image` / `--tpu-image` at compile time take a digest as well
(`ghcr.io/fusedit/fusedit@sha256:...`, or `name:tag@sha256:...`), kept as given on every task and job pod.
"""
IMAGE = "ghcr.io/fusedit/fusedit:0.1.0"
# The torch-xla image (docker/Dockerfile.tpu: torch 2.9.1 + torch-xla[tpu] 2.9.0) for the TPU training
# steps; same tag as IMAGE, built from the same commit.
TPU_IMAGE = "ghcr.io/fusedit/fusedit-tpu:0.1.0"
