"""Imports flow one way: errors <- model <- components (steps) <- pipelines <- CLI.

Read from the source (every import statement, those inside functions included), not by importing it:
a module may import its own layer and the layers below, never one above, and nothing imports the CLI
except the CLI.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {"model": "fusedit.model", "components": "fusedit.components", "pipelines": "fusedit.pipelines",
           "k8s/jobs": "fusedit.jobs", "cli": "fusedit"}
# package prefix -> layer rank (longest prefix wins); fusedit.errors is the shared base under everything
RANKS = {"fusedit.errors": 0, "fusedit.model": 1, "fusedit.components": 2, "fusedit.jobs": 2,
         "fusedit.pipelines": 3, "fusedit": 4}


def rank(module: str) -> int:
    prefix = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[prefix]


def module_name(path: Path) -> str:
    for folder, package in FOLDERS.items():
        if path.is_relative_to(ROOT / folder):
            rest = path.relative_to(ROOT / folder).with_suffix("").parts
            return ".".join([package, *[p for p in rest if p != "__init__"]])
    raise AssertionError(path)


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return [(line, m) for line, m in out if m == "fusedit" or m.startswith("fusedit.")]


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        me = module_name(path)
        for line, target in imports(path):
            if rank(target) > rank(me):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {me} (layer {rank(me)}) imports {target} "
                           f"(layer {rank(target)})")
    return bad


def project_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_imports_flow_one_way():
    files = project_files()
    assert len(files) > 60 and any(p.name == "ablate_cli.py" for p in files)
    assert not violations(files), "\n".join(violations(files))


def test_a_backwards_import_is_caught(tmp_path):
    """A step module that imports the pipelines (the case that once existed) is reported."""
    planted = ROOT / "components" / "_planted_layer_test.py"
    planted.write_text("def f():\n    from fusedit.pipelines.workflow import Options\n    return Options\n")
    try:
        found = violations([planted])
    finally:
        planted.unlink()
    assert found == ["components/_planted_layer_test.py:2: fusedit.components._planted_layer_test (layer 2) "
                     "imports fusedit.pipelines.workflow (layer 3)"]
