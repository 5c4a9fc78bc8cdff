"""Plumbing every step uses (storage, tar shards, the device, the container images its KFP components run on);
it imports no step."""
