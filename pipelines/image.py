"""The one container image every KFP component runs on (the project installed, CLI on PATH)."""
IMAGE = "ghcr.io/fusedit/fusedit:0.1.0"
