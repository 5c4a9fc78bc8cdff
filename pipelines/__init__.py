"""Kubeflow Pipelines drivers: thin components over fusedit.components."""
