"""`fusedit eval run` and `fusedit eval compare`: thin wrappers over components/evaluate/run.py."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from fusedit.errors import UserError

app = typer.Typer(no_args_is_help=True, help="Evaluate exported pipelines (GenEval, DPG, FID, CLIP, synthetic).")


@app.command()
def run(
    pipeline: str = typer.Option(None, help="exported pipeline directory or s3:// prefix"),
    suite: list[str] = typer.Option(None, "--suite", help="synthetic, geneval, dpg, fid, clipscore (repeatable)"),
    output: str = typer.Option(None, help="run directory: metrics.json, report/, samples/"),
    config: Path = typer.Option(None, help="YAML with EvalConfig fields (e.g. params.yaml)"),
    section: str = typer.Option("eval", help="section of --config to read"),
    steps: int = typer.Option(None, min=1),
    guidance: float = typer.Option(None, min=0.0),
    seed: int = typer.Option(None),
    batch_size: int = typer.Option(None, min=1, help="images per forward"),
    resolution: int = typer.Option(None, help="pixels (default: the pipeline's own)"),
    images_per_prompt: int = typer.Option(None, min=1, help="synthetic suite (default 1)"),
    geneval_images_per_prompt: int = typer.Option(None, min=1, help="GenEval (default 4, its protocol)"),
    dpg_images_per_prompt: int = typer.Option(None, min=1, help="DPG-Bench tiles of the 2x2 grid, 1-4 (default 4)"),
    fid_images_per_prompt: int = typer.Option(None, min=1, help="FID (default 1)"),
    limit: int = typer.Option(None, min=1, help="at most this many prompts per suite"),
    device: str = typer.Option(None),
    dtype: str = typer.Option(None, help="auto, fp32, bf16, fp16"),
    overwrite: bool = typer.Option(False, help="discard samples drawn with other settings"),
    synthetic_per_category: int = typer.Option(None, min=1),
    geneval_metadata: str = typer.Option(None, help="GenEval evaluation_metadata.jsonl (path, s3:// or URL)"),
    geneval_results: str = typer.Option(None, help="GenEval's results.jsonl, to summarise"),
    dpg_prompts: str = typer.Option(None, help="DPG-Bench prompts/ folder or dpg_bench.csv"),
    fid_real: str = typer.Option(None, help="real images: folder, shard set, or .npz of mu/sigma"),
    fid_prompts: str = typer.Option(None, help="MJHQ meta_data.json, .txt, .jsonl or a folder of .txt"),
    fid_features: str = typer.Option(None, help="inception, torchscript or random"),
    fid_weights: str = typer.Option(None, help="feature extractor weights (clean-fid inception-2015-12-05.pt)"),
    clip_model: str = typer.Option(None, help="CLIP model name or path"),
    clip_prompts: str = typer.Option(None),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Sample the suites' prompts from a pipeline (resumable), score them, write metrics.json and report/."""
    from fusedit.components.evaluate.config import EvalConfig, load_config
    from fusedit.components.evaluate.run import evaluate

    given = dict(pipeline=pipeline, output=output, suites=suite or None, steps=steps, guidance=guidance, seed=seed,
                 batch_size=batch_size, resolution=resolution, images_per_prompt=images_per_prompt, limit=limit,
                 geneval_images_per_prompt=geneval_images_per_prompt, dpg_images_per_prompt=dpg_images_per_prompt,
                 fid_images_per_prompt=fid_images_per_prompt,
                 device=device, dtype=dtype, overwrite=overwrite or None, synthetic_per_category=synthetic_per_category,
                 geneval_metadata=geneval_metadata, geneval_results=geneval_results, dpg_prompts=dpg_prompts,
                 fid_real=fid_real, fid_prompts=fid_prompts, fid_features=fid_features, fid_weights=fid_weights,
                 clip_model=clip_model, clip_prompts=clip_prompts, progress=False if quiet else None)
    if config is not None:
        cfg = load_config(str(config), section, **given)
    else:
        if not pipeline or not output:
            raise UserError("--pipeline and --output are required (or --config with both)")
        cfg = EvalConfig.model_validate({k: v for k, v in given.items() if v is not None})
    res = evaluate(cfg)
    if res.report is None:
        return  # a non-zero rank under torchrun
    for name, m in res.metrics.items():
        typer.echo(f"{name}: " + "  ".join(f"{k}={v:.4g}" for k, v in m.items()))
    typer.echo(f"report: {res.report}  ({res.seconds:.0f} s)")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories (or metrics.json files)"),
    out: Path = typer.Option(None, help="also write compare.md and compare.html here"),
) -> None:
    """One table (and a bar plot) of the metrics of several runs, e.g. deep vs shallow fusion."""
    from fusedit.components.evaluate.evals.report import compare_html, flatten, markdown_table

    table = {}
    for r in runs:
        f = r / "metrics.json" if r.is_dir() else r
        if not f.is_file():
            raise UserError(f"{r}: no metrics.json (not an evaluation run)")
        try:
            metrics = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{f}: not valid JSON ({exc.msg})") from None
        name = r.name if r.is_dir() else r.parent.name
        while name in table:
            name += "'"
        table[name] = flatten(metrics)
    md = markdown_table(table)
    typer.echo(md, nl=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        (out / "compare.html").write_text(compare_html(table))
        typer.echo(f"wrote {out}/compare.md, {out}/compare.html")
