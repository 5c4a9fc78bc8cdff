"""The ablation as one KFP pipeline: data once, a ParallelFor over the runs (cache -> stages -> evaluate -> result),
one comparison step over the collected results; and the result/compare component bodies on real files."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from fusedit.components.ablate.component import ablation_report_op, run_result_op
from fusedit.components.ablate.spec import load_spec, runs
from tests import warm
from tests.test_ablate_report import GRID, make_run

ROOT = Path(__file__).resolve().parents[1]
STAGES = [s["name"] for s in yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["stages"]]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kfp") / "toy.yaml"
    r = subprocess.run([warm.FUSEDIT, "ablate", "compile", "ablations/toy.yaml", "--out", str(out),
                        "--parallelism", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _names(dag: dict) -> dict[str, str]:
    return {k: t["taskInfo"]["name"] for k, t in dag["tasks"].items()}


def test_data_once_then_a_fan_out_over_every_run_then_one_comparison(compiled):
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    loops = [k for k in root if k.startswith("for-loop")]
    assert len(loops) == 1
    loop = root[loops[0]]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--runs"
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert "filter" in _names(spec["root"]["dag"]).values()  # outside the loop: once
    body = spec["components"][loop["componentRef"]["name"]]["dag"]
    inside = set(_names(body).values())
    assert {"cache", "evaluate", "run-result", *(f"train-{s}" for s in STAGES)} <= inside
    assert "filter" not in inside and "synth" not in inside
    assert body["tasks"]["cache-op"]["inputs"]["artifacts"]["filtered"]["componentInputArtifact"].endswith(
        "filter-op-filtered")
    compare = next(t for t in root.values() if t["taskInfo"]["name"] == "compare")
    src = compare["inputs"]["artifacts"]["results"]["taskOutputArtifact"]
    assert src["producerTask"] == loops[0] and "run-result-op-result" in src["outputArtifactKey"]
    outs = spec["components"][compare["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
    assert outs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outs["summary"]["artifactType"]["schemaTitle"] == "system.Markdown"
    default = spec["root"]["inputDefinitions"]["parameters"]["runs"]["defaultValue"]
    toy = load_spec(ROOT / "ablations" / "toy.yaml", ROOT / "params.yaml")
    assert [r["run"] for r in default] == [r.name for r in runs(toy)]
    assert {r["recipe"] for r in default} == {"tiny", "tiny-shallow", "tiny-cross"}
    steps = {json.loads(r["train_params"])["train"]["stages"][0]["steps"] for r in default}
    assert steps == {toy.stages["base"]["steps"]}


def test_every_run_trains_on_the_accelerators_parameter(compiled):
    spec, k8s = compiled
    loop = next(t for k, t in spec["root"]["dag"]["tasks"].items() if k.startswith("for-loop"))
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    for t in body.values():
        if t["taskInfo"]["name"].startswith("train-"):
            ex = spec["components"][t["componentRef"]["name"]]["executorLabel"]
            acc = executors[ex]["container"]["resources"]["accelerator"]
            assert "pipelinechannel--accelerators" in acc["resourceCount"]
            assert t["inputs"]["parameters"]["recipe"]["componentInputParameter"].endswith("loop-item")
            assert not t["cachingOptions"].get("enableCache", False)
            assert k8s[ex]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith("node_selector")


def test_result_and_compare_bodies_make_the_report_from_a_run_root(tmp_path, monkeypatch):
    """run_result_op reads <run root>/{train,eval} (as the pipeline's train and evaluate tasks write them)."""
    monkeypatch.chdir(tmp_path)  # no data/tiny/llm here: the parameter count comes from the stage's metrics
    made = make_run(tmp_path / "made", "deep", 1, *GRID[("deep", 1)])
    run_root = tmp_path / "root" / "deep"
    (run_root / "train").mkdir(parents=True)
    (made / "train" / "base").rename(run_root / "train" / "base")
    (made / "eval").rename(run_root / "eval")
    item = json.loads((made / "run.json").read_text())
    results = []
    for name, root in [("deep", str(run_root)), ("bare", "")]:
        res = dsl.Artifact(name="result", uri=str(tmp_path / "results" / name))
        metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "m"), metadata={"synthetic/overall": 0.25})
        final = dsl.Model(name="model", uri=str(tmp_path / "none"), metadata={"stage": "base"})
        run = dict(item, run=name, variant=name if name == "bare" else "deep", overrides={},
                   paper={"expect": "lower"} if name == "bare" else None)
        run_result_op.python_func(result=res, run=run, stages=["base"], eval_metrics=metrics, final=final,
                                  run_root=root, overrides=[])
        results.append(res)
    deep = Path(results[0].path)
    assert json.loads((deep / "eval" / "metrics.json").read_text()) == json.loads(
        (run_root / "eval" / "metrics.json").read_text())
    assert len(list((deep / "eval" / "samples" / "synthetic").glob("*/*.png"))) == 4
    assert (deep / "train" / "base" / "loss.tsv").is_file()
    rec = json.loads((deep / "run.json").read_text())
    assert rec["trainable_params"] == 1000  # the stage's own count: this tiny recipe's LLM is not here
    bare = Path(results[1].path)
    assert json.loads((bare / "eval" / "metrics.json").read_text()) == {"synthetic": {"overall": 0.25}}
    report = dsl.HTML(name="report", uri=str(tmp_path / "out" / "report.html"))
    summary = dsl.Markdown(name="summary", uri=str(tmp_path / "out" / "summary.md"))
    ablation = dsl.Artifact(name="ablation", uri=str(tmp_path / "out" / "ablation.json"))
    (tmp_path / "out").mkdir()
    ablation_report_op.python_func(results=results, report=report, summary=summary, ablation=ablation)
    doc = json.loads(Path(ablation.path).read_text())
    assert list(doc["variants"]) == ["deep", "bare"] and doc["reference"] == "deep"
    assert doc["variants"]["bare"]["delta"]["synthetic/overall"]["delta"] == pytest.approx(
        0.25 - doc["variants"]["deep"]["metrics"]["synthetic/overall"]["mean"])
    assert "| bare |" in Path(summary.path).read_text() and "<polyline" in Path(report.path).read_text()
    assert [(c["variant"], c["verdict"]) for c in doc["claims"]] == [("bare", "not resolved")]  # one seed
