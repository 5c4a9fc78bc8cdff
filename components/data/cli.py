"""`fusedit data synth|filter|compare`: the command-line driver of the data step (DVC calls the first two)."""
from __future__ import annotations

import json
import logging
import time

import typer

app = typer.Typer(no_args_is_help=True, help="Synthetic shards, the shard filter, and comparing filtered data.")


@app.command()
def synth(
    out: str = typer.Option(..., "--out", help="output directory or s3:// prefix for the shards"),
    samples: int = typer.Option(2000, "--samples", min=1, help="number of samples"),
    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same bytes)"),
    shard_size: int = typer.Option(500, "--shard-size", min=1, help="samples per shard"),
    bad_fraction: float = typer.Option(0.1, "--bad-fraction", min=0.0, max=1.0,
                                       help="fraction of deliberately broken samples"),
) -> None:
    """Write the embedded default data set: drawn scenes with captions and a known share of bad samples."""
    from fusedit.components.data.synth import main_summary_line
    from fusedit.components.data.synth import synth as run_synth

    t0 = time.perf_counter()
    summary = run_synth(out, samples=samples, seed=seed, shard_size=shard_size, bad_fraction=bad_fraction)
    typer.echo(main_summary_line(summary, out, time.perf_counter() - t0))


@app.command("filter")
def filter_cmd(
    input: str = typer.Option(None, "--input", help="shards: paths, brace patterns, directories, s3:// URIs"),
    output: str = typer.Option(None, "--output", help="output directory or s3:// prefix"),
    config: str = typer.Option(None, "--config", help="YAML file with FilterConfig fields"),
    section: str = typer.Option(None, "--section", help="dotted section of --config, e.g. data.filter"),
    tokenizer: str = typer.Option(None, "--tokenizer", help="tokenizer path for the caption token limit"),
    workers: int = typer.Option(None, "--workers", min=0, help="processes (0 = all cores)"),
    fail_on_quality: bool = typer.Option(None, "--fail-on-quality/--no-fail-on-quality",
                                         help="exit non-zero when the data-quality suite fails"),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3 endpoint (else env / AWS default)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Decode, check, dedupe and reshard; write rejects, stats, metrics and the data-quality report."""
    from fusedit.components.data.filter import filter_shards
    from fusedit.components.data.filter_config import load_filter_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_filter_config(config, section, input=input, output=output, tokenizer=tokenizer,
                             workers=workers, fail_on_quality=fail_on_quality)
    if endpoint_url:
        cfg.s3.endpoint_url = endpoint_url
    result = filter_shards(cfg)
    if as_json:
        typer.echo(result.model_dump_json(indent=2, exclude={"metrics"}))
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(result.reasons.items(), key=lambda kv: -kv[1]))
    quality = {None: "not run", True: "passed", False: "FAILED"}[result.quality_success]
    typer.echo(f"{'reused' if result.reused else 'filtered'} {result.n_in} samples: kept {result.n_kept}, "
               f"rejected {result.n_rejected}{' (' + reasons + ')' if reasons else ''}; "
               f"{len(result.shards)} shard(s) in {result.output}; data quality {quality}")
    if result.n_bad_shards:
        bad = result.metrics.get("bad_shards", [])
        typer.echo(f"bad shards ({result.n_bad_shards}): " + json.dumps([b["shard"] for b in bad]))
    if result.quality_success is False:
        typer.echo("failed: " + "; ".join(result.failed_expectations))


@app.command()
def compare(
    old: str = typer.Argument("data/filtered", help="old filter output: directory, s3:// prefix, or a path in "
                                                    "the DVC repo with --rev"),
    new: str = typer.Argument("data/filtered", help="new filter output (a path in the DVC repo with --new-rev)"),
    out: str = typer.Option(..., "--out", help="directory for compare.json, compare.md and index.html"),
    rev: str = typer.Option(None, "--rev", help="read OLD at this git revision of the DVC repo (e.g. HEAD~1)"),
    new_rev: str = typer.Option(None, "--new-rev", help="read NEW at this revision (default: as it is now)"),
    repo: str = typer.Option(".", "--repo", help="the DVC repository for --rev / --new-rev (path or git URL)"),
    config: str = typer.Option(None, "--config", help="YAML file with CompareConfig fields (columns, ks_*, gate)"),
    section: str = typer.Option(None, "--section", help="dotted section of --config, e.g. data.compare"),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="exit 1 when the gate is crossed"),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3 endpoint (else env / AWS default)"),
    from_config: bool = typer.Option(False, "--from-config", help="OLD is the config's `baseline` (or "
                                     "data/filtered at `baseline_rev`); with neither, write a note and exit 0"),
) -> None:
    """What changed from OLD to NEW filtered data: counts, reject rates per reason, distribution shifts and
    expectation results; exits 1 when the configured gate is crossed (after writing the reports)."""
    from fusedit.components.data.compare import compare as run_compare
    from fusedit.components.data.compare import load_compare_config, load_side
    from fusedit.components.data.compare_report import write_compare, write_no_baseline
    from fusedit.components.shared import storage

    cfg = load_compare_config(config, section)
    if endpoint_url:
        storage.configure(endpoint_url=endpoint_url)
    if from_config:
        if not (cfg.baseline or cfg.baseline_rev):
            path = write_no_baseline(out, f"{config}:{section}" if section else str(config))
            typer.echo(f"no baseline configured: nothing to compare ({path})")
            return
        old, rev = cfg.baseline or "data/filtered", cfg.baseline_rev
    old_side, new_side = load_side(old, rev, repo), load_side(new, new_rev, repo)
    diff = run_compare(old_side, new_side, cfg)
    files = write_compare(diff, old_side, new_side, out)
    g = diff["gate"]
    typer.echo(f"compared {diff['old']} -> {diff['new']}: gate {'passed' if g['passed'] else 'FAILED'}; "
               f"{files['html']}, {files['markdown']}, {files['json']}")
    if gate and not g["passed"]:
        typer.echo("gate failed: " + "; ".join(g["violations"]), err=True)
        raise typer.Exit(1)
