"""Evaluation suites: name -> module with `prepare(ctx) -> list[Job]` and `score(ctx) -> SuiteResult`."""
from __future__ import annotations

from importlib import import_module

from fusedit.errors import UserError

SUITES = {
    "synthetic": "fusedit.components.evals.synthetic",
    "geneval": "fusedit.components.evals.geneval",
    "dpg": "fusedit.components.evals.dpg",
    "fid": "fusedit.components.evals.fid",
    "clipscore": "fusedit.components.evals.clipscore",
}


def suite(name: str):
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r} (one of {', '.join(SUITES)})")
    return import_module(SUITES[name])
