"""Imports flow one way: errors <- model <- components (steps) <- pipelines <- CLI.

Read from the source (every import statement, those inside functions included), not by importing it:
a module may import its own layer and the layers below, never one above, and nothing imports the CLI
except the CLI. Within components/, a step package (data, tiny, cache, train, evaluate, ablate) imports another
step only through the modules that step lists in its `PUBLIC` (the trainer reads the cache through
`cache.reader`, never its builder), and components/shared imports no step at all.
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


def imports(path: Path, names: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every project import; with `names`, `from package import name` gives
    package.name (the submodule it may be) instead of the package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names] if names else \
                [(node.lineno, node.module)]
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


COMPONENTS = "fusedit.components"
SHARED = f"{COMPONENTS}.shared"


def steps() -> dict[str, tuple[str, ...]]:
    """Step package -> its public modules (`PUBLIC` in its __init__.py, read from the source)."""
    out = {}
    for init in sorted((ROOT / "components").glob("*/__init__.py")):
        if init.parent.name == "shared":
            continue
        tree = ast.parse(init.read_text())
        value = next((n.value for n in tree.body if isinstance(n, ast.Assign)
                      and getattr(n.targets[0], "id", None) == "PUBLIC"), None)
        assert value is not None, f"{init.relative_to(ROOT)} names no PUBLIC modules"
        out[f"{COMPONENTS}.{init.parent.name}"] = tuple(ast.literal_eval(value))
    return out


def step_of(module: str, packages: dict[str, tuple[str, ...]]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def component_imports(path: Path) -> list[tuple[int, str]]:
    return [(line, m) for line, m in imports(path, names=True) if m.startswith(COMPONENTS + ".")]


def step_violations(files: list[Path]) -> list[str]:
    packages, bad = steps(), []
    for path in files:
        me = module_name(path)
        mine = step_of(me, packages)
        if mine is None and not me.startswith(SHARED + ".") and me != SHARED:
            continue  # not a step module: pipelines and the CLI may import any step module
        for line, target in component_imports(path):
            theirs = step_of(target, packages)
            if theirs is None or theirs == mine:
                continue
            where = f"{path.relative_to(ROOT)}:{line}: {me}"
            if mine is None:
                bad.append(f"{where} imports {target}: components/shared imports no step")
            elif not any(step_of(target, {f"{theirs}.{p}": ()}) for p in packages[theirs]):
                bad.append(f"{where} imports {target}, not one of {theirs}'s public modules "
                           f"{list(packages[theirs])}")
    return bad


def project_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_imports_flow_one_way():
    files = project_files()
    assert len(files) > 60 and (ROOT / "components" / "ablate" / "cli.py") in files
    assert not violations(files), "\n".join(violations(files))


def test_steps_import_each_other_only_through_public_modules():
    files = project_files()
    assert set(steps()) == {f"{COMPONENTS}.{s}" for s in ("data", "tiny", "cache", "train", "evaluate",
                                                                          "ablate")}
    assert steps()[f"{COMPONENTS}.cache"] == ("reader",)
    assert not step_violations(files), "\n".join(step_violations(files))


def component_definitions(path: Path) -> list[str]:
    """Functions `path` decorates with `dsl.component` / `dsl.container_component` (read from the source)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if getattr(target, "attr", getattr(target, "id", "")) in ("component", "container_component"):
                    out.append(node.name)
    return out


def test_pipelines_only_wire_the_steps_components():
    """Every KFP component is defined in its step's folder (components/<step>/component.py); pipelines/ only wires
    them (issue 16: one folder per containerized step)."""
    defined = {p.relative_to(ROOT).as_posix(): component_definitions(p) for p in project_files()}
    assert not {p: n for p, n in defined.items() if n and not p.startswith("components/")}
    assert {p for p, n in defined.items() if n} == {f"components/{s}/component.py" for s in
                                                   ("data", "tiny", "cache", "train", "evaluate", "ablate")}
    names = {n for ns in defined.values() for n in ns}
    assert {"tiny_op", "run_paths_op", "run_result_op", "ablation_report_op"} <= names


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


def test_a_step_reading_another_steps_internals_is_caught():
    """The trainer importing the cache's builder, and the shared plumbing importing any step, are reported;
    the trainer importing the cache's reader is not."""
    planted = {ROOT / "components" / "train" / "_planted_step_test.py":
               "from fusedit.components.cache import reader\nfrom fusedit.components.cache.build import build_cache\n",
               ROOT / "components" / "shared" / "_planted_step_test.py":
               "def f():\n    from fusedit.components.cache.reader import open_features\n    return open_features\n"}
    try:
        for path, text in planted.items():
            path.write_text(text)
        found = step_violations(sorted(planted))
    finally:
        for path in planted:
            path.unlink()
    assert found == [
        "components/shared/_planted_step_test.py:2: fusedit.components.shared._planted_step_test imports "
        "fusedit.components.cache.reader.open_features: components/shared imports no step",
        "components/train/_planted_step_test.py:2: fusedit.components.train._planted_step_test imports "
        "fusedit.components.cache.build.build_cache, not one of fusedit.components.cache's public modules ['reader']",
    ]


def test_every_package_folder_is_installed():
    """Each folder with an `__init__.py` under the mapped folders is in pyproject's `packages`: a folder left
    out imports in the editable dev install (by path) and is missing from the built wheel and the image."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(init) for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
