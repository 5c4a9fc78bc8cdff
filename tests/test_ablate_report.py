"""The ablation report: deltas with t-intervals over seeds, every variant in the table, the loss plot and the
sample grid, and the page rendered by headless Chromium."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from scipy import stats

from fusedit.components.evaluate.evals.synthetic import score_verdicts
from fusedit.components.evaluate.evals.synthetic import write_prompts as write_synthetic_prompts
from tests import warm
from tests.repo_helpers import chromium_dom

CATS = ["single_object", "colors"]
VARIANTS = ["deep", "shallow-self", "no-temb"]
CLAIMS = {"shallow-self": {"expect": "higher", "metric": "train/base/final_loss", "source": "unit"},
          "no-temb": {"expect": "not_worse", "margin": 0.05}}


def write_eval(root: Path, verdicts: list[bool], color: tuple[int, int, int]) -> dict:
    """An evaluation directory as `fusedit eval run` writes it: samples, prompts, judgements, metrics.json."""
    specs, rows = [], []
    for c, cat in enumerate(CATS):
        for i in range(2):
            ok = verdicts[2 * c + i]
            spec = {"category": cat, "prompt": f"{cat} prompt {i}", "groups": [], "relation": None}
            specs.append(spec)
            rel = f"samples/synthetic/{cat}/{i:03d}_0.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), color).save(root / rel)
            rows.append({"image": rel, "category": cat, "prompt": spec["prompt"], "correct": ok})
    write_synthetic_prompts(root / "samples" / "synthetic" / "prompts.jsonl", specs)
    with open(root / "samples" / "synthetic" / "judgements.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    blind = score_verdicts([(s, not r["correct"]) for s, r in zip(specs, rows, strict=True)])
    metrics = {"synthetic": dict(score_verdicts([(s, r["correct"]) for s, r in zip(specs, rows, strict=True)]),
                                 images=len(rows), **{f"text_blind_{k}": v for k, v in blind.items()})}
    (root / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def write_train(root: Path, stage: str, losses: list[float], params: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "loss.tsv").write_text("step\tloss\tlr\n" + "".join(
        f"{i + 1}\t{v}\t0.001\n" for i, v in enumerate(losses)))
    (root / "metrics.json").write_text(json.dumps({"stage": stage, "steps": len(losses), "final_loss": losses[-1],
                                                   "trainable_params": params}))
    (root / "timing.json").write_text(json.dumps({"images_per_s": 123.0}))  # untracked: never reported


def make_run(runs: Path, variant: str, seed: int, verdicts: list[bool], final_loss: float) -> Path:
    d = runs / (f"{variant}-s{seed}")
    color = (40 * VARIANTS.index(variant), 200, 30 * seed)
    write_eval(d / "eval", verdicts, color)
    write_train(d / "train" / "base", "base",
                [1.5 - 0.01 * i * (1 + VARIANTS.index(variant)) for i in range(49)] + [final_loss],
                1000 + VARIANTS.index(variant))
    (d / "run.json").write_text(json.dumps({
        "spec": "unit", "run": d.name, "variant": variant, "seed": seed, "recipe": "tiny",
        "overrides": {} if variant == "deep" else {"x": variant}, "reference": "deep", "variants": VARIANTS,
        "trainable_params": 1000 + VARIANTS.index(variant), "paper": CLAIMS.get(variant)}))
    return d


# per (variant, seed): judge verdicts of the 4 samples, final training loss
GRID = {("deep", 1): ([True, True, False, True], 0.100), ("deep", 2): ([True, False, False, True], 0.110),
        ("deep", 3): ([True, True, True, True], 0.090),
        ("shallow-self", 1): ([False, True, False, False], 0.120), ("shallow-self", 2): ([True, False, False, False],
                                                                                        0.118),
        ("shallow-self", 3): ([False, False, False, True], 0.125),
        ("no-temb", 1): ([True, True, False, True], 0.101)}


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    from fusedit.components.ablate.report import write_ablation_report

    runs = tmp_path_factory.mktemp("runs")
    for (variant, seed), (verdicts, final_loss) in GRID.items():
        make_run(runs, variant, seed, verdicts, final_loss)
    out = runs.parent / "report"
    files = write_ablation_report([runs], out)
    return runs, files, json.loads(files["json"].read_text())


def _overall(verdicts):
    return (sum(verdicts[:2]) / 2 + sum(verdicts[2:]) / 2) / 2


def test_deltas_against_the_reference_are_paired_t_intervals_over_seeds(reported):
    _, _, doc = reported
    assert doc["reference"] == "deep" and list(doc["variants"]) == VARIANTS
    diffs = [_overall(GRID[("shallow-self", s)][0]) - _overall(GRID[("deep", s)][0]) for s in (1, 2, 3)]
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    d = doc["variants"]["shallow-self"]["delta"]["synthetic/overall"]
    assert d["method"] == "paired t" and d["n"] == 3
    assert d["delta"] == pytest.approx(sum(diffs) / 3) and (d["lo"], d["hi"]) == pytest.approx((lo, hi))
    one = doc["variants"]["no-temb"]["delta"]["train/base/final_loss"]  # a single seed: no interval
    assert one["lo"] is None and one["delta"] == pytest.approx(0.101 - 0.100)
    m = doc["variants"]["deep"]["metrics"]["train/base/final_loss"]
    assert m["mean"] == pytest.approx(0.100) and m["n"] == 3 and m["values"] == {"1": 0.100, "2": 0.110, "3": 0.090}
    assert not any("images_per_s" in k for k in doc["metrics"])  # wall-clock figures are not tracked results
    assert doc["variants"]["no-temb"]["metrics"]["trainable_params"]["mean"] == 1002
    assert "synthetic/images" not in doc["metrics"] and doc["metrics"][:2] == ["synthetic/overall",
                                                                             "synthetic/text_blind_overall"]
    k = doc["metrics"].index("synthetic/colors")  # each text-blind score beside its own
    assert doc["metrics"][k + 1] == "synthetic/text_blind_colors"


def test_metric_means_carry_95_intervals_over_seeds(reported):
    _, files, doc = reported
    vals = [_overall(GRID[("deep", s)][0]) for s in (1, 2, 3)]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(vals) / 3, scale=stats.sem(vals))
    m = doc["variants"]["deep"]["metrics"]["synthetic/overall"]
    assert m["mean"] == pytest.approx(sum(vals) / 3) and (m["lo"], m["hi"]) == pytest.approx((lo, hi))
    assert doc["variants"]["no-temb"]["metrics"]["synthetic/overall"]["lo"] is None  # one seed: no interval
    assert f"| synthetic/overall | {sum(vals) / 3:.3f} [{lo:.3f}, {hi:.3f}] |" in files["markdown"].read_text()


def test_each_paper_claim_gets_the_verdict_of_its_metrics_interval(reported):
    _, files, doc = reported
    got = {c["variant"]: c for c in doc["claims"]}
    assert set(got) == set(CLAIMS)  # the reference makes no claim
    loss = got["shallow-self"]
    diffs = [GRID[("shallow-self", s)][1] - GRID[("deep", s)][1] for s in (1, 2, 3)]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert loss["metric"] == "train/base/final_loss" and (loss["delta"]["lo"], loss["delta"]["hi"]) == pytest.approx(
        (lo, hi))
    assert loss["verdict"] == ("reproduced" if lo > 0 else "contradicted" if hi < 0 else "not resolved")
    assert got["no-temb"]["verdict"] == "not resolved"  # one seed cannot resolve anything
    md = files["markdown"].read_text()
    assert "## The paper's claims" in md and f"| **{loss['verdict']}** | unit |" in md
    assert "<table id='claims'>" in files["html"].read_text()


@pytest.mark.parametrize("expect, margin, lo, hi, want", [
    ("higher", 0.0, 0.01, 0.2, "reproduced"), ("higher", 0.0, -0.2, -0.01, "contradicted"),
    ("higher", 0.0, -0.1, 0.1, "not resolved"),
    ("lower", 0.0, -0.2, -0.01, "reproduced"), ("lower", 0.0, 0.01, 0.2, "contradicted"),
    ("lower", 0.0, -0.1, 0.1, "not resolved"),
    ("not_worse", 0.05, -0.04, 0.1, "reproduced"), ("not_worse", 0.05, -0.2, -0.06, "contradicted"),
    ("not_worse", 0.05, -0.1, 0.02, "not resolved"), ("not_worse", 0.05, -0.04, -0.01, "reproduced"),
    ("higher", 0.0, None, None, "not resolved"),
])
def test_claim_verdicts_read_the_interval(expect, margin, lo, hi, want):
    from fusedit.components.ablate.claims import Claim, verdict

    d = {"delta": 0.0 if lo is None else (lo + hi) / 2, "lo": lo, "hi": hi}
    assert verdict(Claim(expect=expect, margin=margin), d) == want


def test_markdown_and_html_hold_every_variant_the_loss_plot_and_the_grid(reported):
    _, files, _ = reported
    md = files["markdown"].read_text()
    assert all(f"| {v} |" in md for v in VARIANTS) and "## Deltas against deep" in md
    page = files["html"].read_text()
    assert page.count("<polyline") == len(VARIANTS)  # one loss curve per variant
    assert not re.search(r"src='(?!data:)", page)  # self-contained
    assert page.count("data:image/png;base64,") == len(VARIANTS) * 4  # 4 prompts x every variant


@pytest.mark.slow
def test_report_in_headless_chromium_shows_every_variant(reported, tmp_path):
    _, files, _ = reported
    dom = chromium_dom(files["html"], tmp_path / "profile")
    metrics = re.search(r'<table id="metrics">(.*?)</table>', dom, re.S).group(1)
    assert re.findall(r"<th>([^<]*)</th>", metrics) == ["metric", *VARIANTS]
    grid = re.search(r'<table class="grid">(.*?)</table>', dom, re.S).group(1)
    assert re.findall(r"<th>([^<]*)</th>", grid) == ["prompt", *VARIANTS]
    assert all(f'data-variant="{v}"' in dom for v in VARIANTS)
    assert grid.count("<img") == 4 * len(VARIANTS) and dom.count("<polyline") == len(VARIANTS)


def test_report_cli(reported, tmp_path):
    runs, _, _ = reported
    r = subprocess.run([warm.FUSEDIT, "ablate", "report", str(runs / "deep-s1"),
                        str(runs / "no-temb-s1"), "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "r" / "ablation.json").read_text())
    assert list(doc["variants"]) == ["deep", "no-temb"]
    r = subprocess.run([warm.FUSEDIT, "ablate", "report", str(tmp_path), "--out",
                        str(tmp_path / "r2")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no runs (directories with run.json)" in r.stderr
