"""Plumbing every step uses (storage, tar shards, the device); it imports no step."""
