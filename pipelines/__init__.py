"""Kubeflow Pipelines wiring: pipelines over the step components (components/<step>/component.py), their
placement on the cluster, compile and submit."""
