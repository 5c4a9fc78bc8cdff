"""Training-job templates (JobSet, PyTorchJob) the training step fills and creates; shipped as package data."""
