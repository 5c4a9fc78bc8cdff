"""Every module a DVC stage runs is one of its dependencies, so editing it reruns the stage.

The oracle reads the source, not the code under test: each stage's step module(s) are followed through
every `fusedit` import (module level and inside functions) to the files they resolve to, and each file
must be listed in the stage's `deps` in dvc.yaml, itself or through a listed folder.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fusedit.model": "model", "fusedit.components": "components", "fusedit.pipelines": "pipelines",
            "fusedit.jobs": "k8s/jobs", "fusedit": "cli"}  # pyproject's package-dir


def suites() -> list[str]:
    """The suite modules the evaluate step loads by name (`SUITES` in evals/__init__.py, read from the source)."""
    tree = ast.parse((ROOT / "components" / "evaluate" / "evals" / "__init__.py").read_text())
    value = next(n.value for n in tree.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "SUITES")
    return list(ast.literal_eval(value).values())


# stage -> the modules its command runs (its step function's module and its CLI group)
STAGES = {
    "synth": ["fusedit.components.data.synth", "fusedit.components.data.cli:synth"],
    "filter": ["fusedit.components.data.filter", "fusedit.components.data.cli:filter_cmd"],
    "tiny": ["fusedit.model.tiny", "fusedit.model.cli"],
    "cache": ["fusedit.components.cache.build", "fusedit.components.cache.cli"],
    "train": ["fusedit.components.train.loop", "fusedit.components.train.cli"],
    "evaluate": ["fusedit.components.evaluate.run", "fusedit.components.evaluate.cli",
                 *suites()],  # the suites it loads by name
}


def source_file(module: str) -> Path | None:
    for prefix in sorted(PACKAGES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            base = ROOT / PACKAGES[prefix] / module[len(prefix):].lstrip(".").replace(".", "/")
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def imported(node: ast.AST) -> list[str]:
    """Absolute module names an AST imports (`from a import b` may name a submodule a.b)."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
    return [m for m in out if m.startswith("fusedit")]


def entry(spec: str) -> tuple[Path, list[str]]:
    """`module` or `module:function` -> its file and what it (or only that function) imports."""
    module, _, func = spec.partition(":")
    path = source_file(module)
    tree = ast.parse(path.read_text())
    if func:
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        return path, imported(node) + [m for t in top for m in imported(t)]
    return path, imported(tree)


def closure(specs: list[str]) -> set[Path]:
    seen: set[Path] = set()
    todo: list[str] = []
    for spec in specs:
        path, mods = entry(spec)
        seen.add(path)
        todo += mods
    while todo:
        path = source_file(todo.pop())
        if path is not None and path not in seen:
            seen.add(path)
            todo += imported(ast.parse(path.read_text()))
    for path in list(seen):  # importing a.b runs a/__init__.py first
        for parent in path.relative_to(ROOT).parents:
            if (ROOT / parent / "__init__.py").is_file() and parent.parts and parent.parts[0] != "cli":
                seen.add(ROOT / parent / "__init__.py")
    return seen


def listed(stage: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return (spec.get("do") or spec)["deps"]


def missing(stage: str) -> list[str]:
    deps = [d.rstrip("/") for d in listed(stage)]
    need = sorted(str(p.relative_to(ROOT)) for p in closure(STAGES[stage]))
    return [n for n in need if not any(n == d or n.startswith(d + "/") for d in deps)]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    assert not missing(stage), f"dvc.yaml stage {stage!r} does not depend on {missing(stage)}"


def test_the_train_stage_depends_on_the_sample_order():
    """The case that drifted: order.py decides which samples each step sees, so every loss. The trainer
    reaches it through the cache's reader, so the train stage depends on the cache folder."""
    assert ROOT / "components" / "cache" / "order.py" in closure(STAGES["train"])
    assert "components/cache" in listed("train")


def test_the_evaluate_stage_depends_on_the_scene_grammar():
    """The synthetic judge scores against the data step's scene grammar, loaded through a suite by name."""
    assert ROOT / "components" / "data" / "scenes.py" in closure(STAGES["evaluate"])
    assert not missing("evaluate")
