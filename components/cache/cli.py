"""`fusedit cache build`: the command-line driver of the cache step (DVC and KFP call the same function)."""
from __future__ import annotations

import re

import typer

from fusedit.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Frozen-LLM text features and VAE latents, computed once.")

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


def parse_bytes(text: str | None) -> int | None:
    """'500G', '2T', '123456' -> bytes (decimal units, an optional trailing B)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)B?\s*", text.upper())
    if not m:
        raise UserError(f"--max-bytes: expected a size like 500G or 1200000 (got {text!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@app.callback()
def _group() -> None:
    """Frozen-LLM text features and VAE latents, computed once."""


@app.command()
def build(
    input: str = typer.Option(..., "--input", help="filtered shards: a directory, pattern or s3:// prefix"),
    output: str = typer.Option(..., "--output", help="cache directory or s3:// prefix"),
    recipe: str = typer.Option(..., "--recipe", help="recipe name (fusedit/baseline) or YAML path"),
    override: list[str] = typer.Option([], "--set", help="dotted recipe override, e.g. model.max_prompt_length=128"),
    dtype: str = typer.Option("bf16", "--dtype", help="storage dtype of the text features: bf16 or fp32"),
    max_bytes: str = typer.Option(None, "--max-bytes", help="refuse if the projected size exceeds this (e.g. 2T)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="captions/images per forward pass"),
    device: str = typer.Option(None, "--device", help="torch device (default: cuda when present, else cpu)"),
    caption: str = typer.Option("synthetic_caption", "--caption", help="caption member trained on"),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3 endpoint (else env / AWS default)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Cache text features and VAE posteriors of every sample; resumable, refuses an oversized cache."""
    from fusedit.components.cache.build import build_cache
    from fusedit.components.shared import storage

    if endpoint_url:
        storage.configure(endpoint_url=endpoint_url)
    result = build_cache(input, output, recipe, override, dtype=dtype, max_bytes=parse_bytes(max_bytes),
                         batch_size=batch_size, device=device, caption=caption)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))


if __name__ == "__main__":  # standalone use (tests, images without the mounted group)
    import sys

    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
