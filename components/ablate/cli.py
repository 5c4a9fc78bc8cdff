"""`fusedit ablate`: check a spec, run it as DVC experiments, collect the results, report.

(`fusedit ablate compile`, which needs the KFP pipelines, lives in pipelines/ablation_cli.py: step code
never imports the pipelines; the `fusedit` CLI mounts it into this group.)
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Ablation studies: one spec, one experiment per variant, one report.")

SPEC = typer.Argument(..., help="ablation spec YAML (e.g. ablations/toy.yaml)")


def _runs_dir(out: Path | None, spec) -> Path:
    return out or Path("data/ablations") / spec.name


def _load(spec: Path, params: Path):
    from fusedit.components.ablate.spec import load_spec

    return load_spec(spec, params)


@app.command()
def check(spec: Path = SPEC, params: Path = typer.Option(Path("params.yaml"), help="params file the runs vary")):
    """Validate a spec (recipes, overrides, shared settings) and list the runs it makes."""
    from fusedit.components.ablate.spec import runs

    s = _load(spec, params)
    for r in runs(s):
        typer.echo(f"{r.experiment}: recipe={r.recipe} seed={r.seed} overrides={r.model_overrides or '{}'}")


@app.command()
def run(
    spec: Path = SPEC,
    out: Path = typer.Option(None, help="runs directory (default: data/ablations/<spec name>)"),
    jobs: int = typer.Option(1, min=1, help="experiments at a time (each uses every core it is given)"),
    force: bool = typer.Option(False, help="replace experiments of the same names"),
    resume: bool = typer.Option(False, help="keep finished and still-queued experiments, re-run failed ones"),
    report: bool = typer.Option(True, help="write OUT/report after collecting"),
) -> None:
    """Queue one `dvc exp run` per variant and seed, run the queue, collect the results and report."""
    from fusedit.components.ablate.driver import queue, run_queue

    s = _load(spec, Path("params.yaml"))
    repo = Path.cwd()
    t0 = time.time()
    todo = queue(s, repo, force, resume)
    typer.echo(f"queued {len(todo)} experiments: {', '.join(r.experiment for r in todo)}")
    if todo:
        run_queue(repo, jobs)
    _collect_and_report(s, repo, _runs_dir(out, s), report)
    typer.echo(f"wall time {time.time() - t0:.0f} s")


def _collect_and_report(s, repo: Path, out: Path, report: bool) -> None:
    from fusedit.components.ablate.driver import collect
    from fusedit.components.ablate.report import write_ablation_report
    from fusedit.errors import UserError

    status = collect(s, repo, out)
    for name, st in status.items():
        typer.echo(f"{name}: {st}")
    if report:
        done = [out / n for n, st in status.items() if st.startswith("collected")]
        if not done:
            raise UserError(f"no run of '{s.name}' finished (see the statuses above)")
        files = write_ablation_report(done, out / "report")
        typer.echo(f"report: {files['html']}")


@app.command("collect")
def collect_cmd(
    spec: Path = SPEC,
    out: Path = typer.Option(None, help="runs directory (default: data/ablations/<spec name>)"),
    report: bool = typer.Option(True, help="write OUT/report after collecting"),
) -> None:
    """Copy the finished experiments' results (metrics, losses, samples) into the runs directory."""
    s = _load(spec, Path("params.yaml"))
    _collect_and_report(s, Path.cwd(), _runs_dir(out, s), report)


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="runs directories (or single run directories)"),
    out: Path = typer.Option(..., help="directory for index.html, report.md and ablation.json"),
) -> None:
    """One HTML report (and Markdown, ablation.json) comparing every variant against the reference."""
    from fusedit.components.ablate.report import write_ablation_report

    files = write_ablation_report(runs, out)
    typer.echo(f"wrote {files['html']}, {files['markdown']}, {files['json']}")
