"""`fusedit train`: one stage from params.yaml, resumable; exit 75 after a SIGTERM-triggered save."""
from __future__ import annotations

import json
import logging
import sys

import typer


def train_command(
    recipe: str = typer.Option(..., help="recipe name or YAML path"),
    stage: str = typer.Option(..., help="stage name declared under train.stages"),
    data: str = typer.Option(..., help="cache or filtered shards (directory or s3:// URI)"),
    output: str = typer.Option(..., help="stage output directory or s3:// URI"),
    params: str = typer.Option("params.yaml", help="file with the `train:` section"),
    override: list[str] = typer.Option([], "--set", help="recipe override, e.g. model.dit_num_layers=2"),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)"),
) -> None:
    """Train one stage; rerun the same command to resume from the last committed checkpoint."""
    from fusedit.components.train.loop import Preempted, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(recipe, stage, data, output, params, override, device)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(75) from None
    typer.echo(json.dumps(result.__dict__))
