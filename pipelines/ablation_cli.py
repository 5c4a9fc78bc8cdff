"""`fusedit ablate compile`: an ablation spec as one KFP v2 pipeline (mounted into the `ablate` group by
the `fusedit` CLI, so the step code in components/ablate/cli.py needs no pipeline import)."""
from __future__ import annotations

from pathlib import Path

import typer

SPEC = typer.Argument(..., help="ablation spec YAML (e.g. ablations/toy.yaml)")


def compile_cmd(
    spec: Path = SPEC,
    out: Path = typer.Option(..., help="where to write the compiled pipeline YAML"),
    parallelism: int = typer.Option(4, min=1, help="variants trained at the same time"),
    params: Path = typer.Option(Path("params.yaml"), help="stage list and defaults"),
    image: str = typer.Option(None, help="image for every step, name:tag or name@sha256:digest "
                                         "(default: fusedit.components.shared.image.IMAGE)"),
    secret: str = typer.Option("fusedit-storage", help="Kubernetes Secret holding the storage credentials"),
    resources: list[str] = typer.Option([], help="STEP=CPU,MEMORY requests over pipelines/resources.py's "
                                                 "defaults, e.g. train=16,128Gi (repeatable)"),
) -> None:
    """Compile the spec to one KFP v2 pipeline: data once, a ParallelFor over the runs, one comparison step.

    The inputs of the spec's evaluation suites that the spec does not give become required run parameters
    (listed after compiling); `fusedit pipeline submit` refuses the run without them."""
    from fusedit.components.ablate.spec import load_spec
    from fusedit.pipelines.ablation import compile_ablation
    from fusedit.pipelines.cli import echo_required
    from fusedit.pipelines.resources import parse
    from fusedit.pipelines.workflow import Options

    s = load_spec(spec, params)
    opts = Options(params=str(params), secret=secret, resources=parse(resources))
    if image:
        opts.image = image
    compile_ablation(s, str(out), opts, parallelism)
    typer.echo(f"wrote {out}")
    echo_required(str(out))
