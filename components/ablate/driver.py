"""The local ablation driver: one `dvc exp run --queue` per (variant, seed), run the queue, collect the results.

Every experiment is the project's own DVC DAG with `-S` settings (recipe, `model.overrides`, seed, and the
spec's shared data/stage/eval settings), so `dvc exp show` lists them beside any other experiment. Stages
whose inputs do not change between variants (synth, filter, tiny) run once: later experiments restore them
from DVC's run cache. `collect` copies each experiment's metrics, loss curves and evaluation samples out
of its git ref and the DVC cache (`DVCFileSystem` at the experiment's commit) into one directory per run:

    RUNS/<run>/run.json                      variant, seed, recipe, overrides, trainable parameters
    RUNS/<run>/train/<stage>/{metrics.json,loss.tsv}
    RUNS/<run>/eval/metrics.json, eval/samples/<suite>/...

which is also what the KFP pipeline's per-variant step writes, and what `fusedit ablate report` reads.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fusedit.components.ablate.spec import Run, Spec, run_params, runs, shared_params
from fusedit.errors import UserError

RESULT_FILES = ("metrics.json", "loss.tsv")  # per training stage
EVAL_ROOT = "data/eval"


def hydra_value(value: Any) -> str:
    """A value in the override grammar `dvc exp run -S` parses (strings always quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _env() -> dict[str, str]:
    """This interpreter's bin directory on PATH (first, unless PATH has it already: an activated venv keeps its
    order), so `dvc` and the stages' `fusedit` are this venv's even when it was not activated."""
    path, bindir = os.environ.get("PATH", ""), str(Path(sys.executable).parent)
    if bindir not in path.split(os.pathsep):
        path = f"{bindir}{os.pathsep}{path}"
    return {**os.environ, "PATH": path}


def dvc(repo: Path, *args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["dvc", *args], cwd=repo, env=_env(), text=True,
                         capture_output=capture)
    if check and res.returncode:
        tail = ((res.stderr or "") + (res.stdout or "")).strip().splitlines()[-5:]
        raise UserError(f"dvc {' '.join(args[:3])} failed in {repo}: {' / '.join(tail)}")
    return res


def _git_head(repo: Path) -> str:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if res.returncode:
        raise UserError(f"{repo}: not a git repository with a commit (dvc exp run --queue queues commits)")
    return res.stdout.strip()


def _baselines(repo: Path, names: set[str]) -> list[str]:
    """The commits the named experiments ran from (DVC keeps each as `refs/exps/<sha[:2]>/<sha[2:]>/<name>`),
    oldest experiment first, then HEAD: a commit made while a grid runs does not hide its experiments."""
    res = subprocess.run(["git", "for-each-ref", "--sort=committerdate", "--format=%(refname)", "refs/exps/"],
                         cwd=repo, capture_output=True, text=True)
    head, found = _git_head(repo), []
    for ref in res.stdout.split():
        parts = ref.split("/")
        if len(parts) == 5 and parts[4] in names and parts[2] + parts[3] not in (head, *found):
            found.append(parts[2] + parts[3])
    return [*found, head]


def experiments(repo: Path, names: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Experiment name -> {"rev", "baseline", "state", "log", ...} for the experiments of the current commit
    and, for `names`, of whichever commit they ran from (`dvc exp show`); HEAD's win a name clash."""
    revs = [a for b in _baselines(repo, names or set()) for a in ("--rev", b)]
    out: dict[str, dict[str, Any]] = {}
    shown = json.loads(dvc(repo, "exp", "show", "--json", "--no-pager", *revs).stdout or "[]")
    for commit in shown:
        for exp in commit.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            ex = exp.get("executor") or {}
            name = exp.get("name") or rev.get("name")
            if name:  # a later commit's experiment of the same name wins
                state = ex.get("state") or "success"
                out[name] = {"rev": rev.get("rev"), "baseline": commit.get("rev"), "state": state,
                             "finished": (rev.get("data") or {}).get("timestamp"),
                             "log": (ex.get("local") or {}).get("log"), "error": exp.get("error") or rev.get("error")}
    return out


def queue(spec: Spec, repo: Path, force: bool = False, resume: bool = False) -> list[Run]:
    """Queue one experiment per run of the spec; returns the runs queued.

    A name already taken stops everything unless `force` (replace it) or `resume` (keep a finished or
    still-queued experiment, replace a failed one: an interrupted grid goes on where it stopped)."""
    _git_head(repo)
    for f in ("dvc.yaml", "params.yaml"):
        if not (repo / f).is_file():
            raise UserError(f"{repo}: no {f} (run from the project's root)")
    params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    if "overrides" not in (params.get("model") or {}):
        raise UserError(f"{repo / 'params.yaml'}: no model.overrides parameter (the DAG cannot vary the recipe)")
    todo = runs(spec)
    existing = experiments(repo, {r.experiment for r in todo})  # at any baseline commit
    taken = [r.experiment for r in todo if r.experiment in existing]
    if taken and not (force or resume):
        raise UserError(f"experiments already exist: {', '.join(taken)} (pass --force to replace them, "
                        "--resume to keep the finished ones)")
    replace = [n for n in taken if force or existing[n]["state"] == "failed"]
    if replace:
        dvc(repo, "exp", "remove", *replace)
    todo = [r for r in todo if r.experiment not in taken or r.experiment in replace]
    shared = shared_params(spec, params)
    for r in todo:
        sets = [a for k, v in {**shared, **run_params(r)}.items() for a in ("-S", f"{k}={hydra_value(v)}")]
        dvc(repo, "exp", "run", "--queue", "-n", r.experiment, *sets)
    return todo


def run_queue(repo: Path, jobs: int = 1) -> None:
    """Run every queued experiment (`dvc exp run --run-all`), `jobs` at a time; returns when all ended."""
    res = dvc(repo, "exp", "run", "--run-all", "-j", str(jobs), check=False, capture=False)
    if res.returncode:
        print(f"dvc exp run --run-all exited with {res.returncode}; collecting what finished", file=sys.stderr)


def _copy_tree(fs, src: str, dest: Path) -> int:
    if not fs.exists(src):
        return 0
    n = 0
    for f in fs.find(src):
        target = dest / os.path.relpath(f, src)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f, str(target))
        n += 1
    return n


def trainable_params(recipe: str, overrides: dict[str, Any], fs=None) -> int | None:
    """The DiT's trainable parameters (fusedit.model.summary on the meta device); a local LLM's config is
    read from the experiment when it is one of its outputs."""
    from fusedit.model.config import load_recipe
    from fusedit.model.summary import summarize

    r = load_recipe(recipe, {"model": overrides} if overrides else None)
    with tempfile.TemporaryDirectory() as tmp:
        llm = r.model.llm
        if fs is not None and not Path(llm).is_absolute() and fs.exists(f"{llm}/config.json"):
            fs.get_file(f"{llm}/config.json", f"{tmp}/config.json")
            r = load_recipe(recipe, {"model": {**overrides, "llm": tmp}})
        try:
            return int(summarize(r)["trainable"])
        except (UserError, OSError, ValueError):
            return None


def run_record(spec: Spec, r: Run, **extra: Any) -> dict[str, Any]:
    var = next(v for v in spec.variants if v.name == r.variant)
    return {"spec": spec.name, "run": r.name, "variant": r.variant, "seed": r.seed, "recipe": r.recipe,
            "overrides": r.model_overrides, "description": var.description,
            "reference": spec.reference_variant.name, "variants": [v.name for v in spec.variants],
            **({"paper": var.paper.model_dump()} if var.paper else {}), **extra}  # KFP items hold no nulls


def collect(spec: Spec, repo: Path, out: Path, stages: list[str] | None = None) -> dict[str, str]:
    """Copy every run's results out of its experiment into out/<run>/; returns run -> status."""
    from dvc.api import DVCFileSystem

    params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    stages = stages or [s["name"] for s in params.get("train", {}).get("stages", [])]
    found = experiments(repo, {r.experiment for r in runs(spec)})
    status: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    for r in runs(spec):
        exp = found.get(r.experiment)
        if exp is None or not exp.get("rev"):
            status[r.name] = "missing (not run)"
            continue
        if exp["state"] not in ("success", None):
            status[r.name] = f"{exp['state']} (log: {exp.get('log')})"
            continue
        fs = DVCFileSystem(str(repo), rev=exp["rev"])
        dest = out / r.name
        if dest.exists():
            shutil.rmtree(dest)
        for st in stages:
            for f in RESULT_FILES:
                src = f"data/train/{st}/{f}"
                if fs.exists(src):
                    (dest / "train" / st).mkdir(parents=True, exist_ok=True)
                    fs.get_file(src, str(dest / "train" / st / f))
        if not fs.exists(f"{EVAL_ROOT}/metrics.json"):
            status[r.name] = "no evaluation metrics in the experiment"
            continue
        (dest / "eval").mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{EVAL_ROOT}/metrics.json", str(dest / "eval" / "metrics.json"))
        n = _copy_tree(fs, f"{EVAL_ROOT}/samples", dest / "eval" / "samples")
        count = trainable_params(r.recipe, r.model_overrides, fs)
        record = run_record(spec, r, experiment=r.experiment, rev=exp["rev"], baseline=exp.get("baseline"),
                            finished=exp.get("finished"), trainable_params=count)
        (dest / "run.json").write_text(json.dumps(record, indent=1))
        status[r.name] = f"collected ({n} sample files)"
    return status
