"""`fusedit model ...` and `fusedit generate`: thin wrappers over the model library."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from fusedit.errors import UserError
from fusedit.model.presets import DEMO_FAMILY

app = typer.Typer(no_args_is_help=True, help="Recipes, parameter counts and tiny local checkpoints.")


@app.command()
def summary(
    recipe: str = typer.Option(..., help="recipe name (fusedit/baseline) or YAML path"),
    override: list[str] = typer.Option([], "--set", help="dotted override, e.g. model.dit_num_layers=10"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Parameter counts at the real shapes, on the meta device (nothing is downloaded)."""
    from fusedit.model.config import load_recipe
    from fusedit.model.summary import summarize

    s = summarize(load_recipe(recipe, override))
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    typer.echo(f"{s['recipe']}: trainable {s['trainable']:,}  frozen {s['frozen']:,}  "
               f"({s['dit_layers']} DiT layers, shared LLM layers {s['shared_llm_layers'] or 'none'})")
    for name, n in sorted(s["by_module"].items()):
        typer.echo(f"  {name:32s} {n:>15,}")


@app.command("list")
def list_recipes() -> None:
    """The shipped recipes."""
    from fusedit.model.config import recipe_names

    typer.echo("\n".join(recipe_names()))


@app.command("init-tiny")
def init_tiny(
    out: Path = typer.Option(..., help="directory to write llm/, vae/ and pipeline/ into"),
    family: str = typer.Option(DEMO_FAMILY, help="a tiny-* preset of fusedit.model.presets"),
    seed: int = typer.Option(0),
    kv_gain: float = typer.Option(6.0, min=0.0, help="scale of the LLM's key/value projections (1: plain init)"),
) -> None:
    """Write a tiny LLM + tokenizer, a tiny VAE and a tiny exported pipeline (all from_pretrained-able)."""
    from fusedit.model import tiny
    from fusedit.model.presets import LLM_PRESETS

    if family not in LLM_PRESETS or not family.startswith("tiny-"):
        tinies = ", ".join(p for p in LLM_PRESETS if p.startswith("tiny-"))
        raise UserError(f"--family must be one of {tinies} (got '{family}')")
    tiny.write_tiny(out, family, seed, kv_gain)
    typer.echo(f"wrote {out}/llm, {out}/vae, {out}/pipeline")


@app.command("import-reference")
def import_reference_command(
    src: Path = typer.Argument(..., help="reference transformer directory or whole reference pipeline directory"),
    out: Path = typer.Option(..., "--out", help="directory to write (transformer/, text_encoder/[, pipeline parts])"),
    llm: Path | None = typer.Option(None, help="the LLM of a shallow baseline (its checkpoint does not bundle it)"),
    clip: Path | None = typer.Option(None, help="CLIP text encoder + tokenizer for the text-modulation variant"),
) -> None:
    """Import a checkpoint written by the reference implementation (tang-bd/fuse-dit), e.g. the released ones."""
    from fusedit.model.reference import import_reference

    if not src.is_dir():
        raise UserError(f"SRC {src}: not a directory")
    dst = import_reference(src, out, llm=llm, clip=clip)
    typer.echo(f"wrote {dst} (load it with fusedit.model.load_denoiser, or fusedit generate --pipeline when it "
               "came from a whole pipeline)")


def generate(
    pipeline: Path = typer.Option(..., help="exported pipeline directory"),
    prompt: str = typer.Option(...),
    out: Path = typer.Option(..., help="output PNG"),
    seed: int = typer.Option(42),
    steps: int = typer.Option(25, min=1),
    guidance: float = typer.Option(6.0, min=0.0),
) -> None:
    """Generate one image from an exported pipeline."""
    import torch

    from fusedit.model.pipeline import FuseDiTPipeline

    if not (pipeline / "model_index.json").is_file():
        raise UserError(f"--pipeline {pipeline}: not an exported pipeline (no model_index.json)")
    try:
        pipe = FuseDiTPipeline.from_pretrained(str(pipeline), use_safetensors=True)  # weights never unpickled
    except (OSError, ValueError) as exc:
        raise UserError(f"--pipeline {pipeline}: cannot load ({type(exc).__name__}: {exc})") from None
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    typer.echo(str(out))
