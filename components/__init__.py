"""The workflow's steps, one package per containerized step, shared by the CLI, DVC and KFP.

data -> cache -> train -> evaluate, and ablate over them; `shared` is the plumbing every step uses. A step's
KFP component definitions are its `component.py` (pipelines/ wires them into pipelines).
A step imports another step only through the modules that step names in its `PUBLIC`
(tests/test_layers.py checks it).
"""
