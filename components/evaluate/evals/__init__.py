"""Evaluation suites: name -> module with `prepare(ctx) -> list[Job]` and `score(ctx) -> SuiteResult`."""
from __future__ import annotations

from importlib import import_module

from fusedit.errors import UserError

SUITES = {
    "synthetic": "fusedit.components.evaluate.evals.synthetic",
    "geneval": "fusedit.components.evaluate.evals.geneval",
    "dpg": "fusedit.components.evaluate.evals.dpg",
    "fid": "fusedit.components.evaluate.evals.fid",
    "clipscore": "fusedit.components.evaluate.evals.clipscore",
}


def suite(name: str):
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r} (one of {', '.join(SUITES)})")
    return import_module(SUITES[name])
