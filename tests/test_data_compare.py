"""`fusedit data compare` on real filter outputs of the embedded data: bad_fraction 0.1 against 0.2 (the
expected differences come from synth.json, not from the filter), a changed filter threshold read through DVC
revisions, bad input, and the KFP component under kfp.local."""
from __future__ import annotations

import json
import math
import re
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy.stats import ks_2samp

from fusedit.cli import main
from fusedit.components.data.filter import filter_shards
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.synth import synth
from tests.warm import cli_env

N = 200
DUPLICATES = ("exact_duplicate", "near_duplicate")


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two versions of the embedded data (same seed, 10% and 20% bad samples), each through the filter."""
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, bad in (("a", 0.1), ("b", 0.2)):
        summary = synth(str(root / f"synth-{name}"), samples=N, seed=5, shard_size=100, bad_fraction=bad)
        filter_shards(FilterConfig(input=str(root / f"synth-{name}"), output=str(root / name), workers=1))
        out[name] = (root / name, summary)
    return root, out


def _compare(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["data", "compare", *args])
        raise SystemExit(0)
    cap = capsys.readouterr()
    return exit_.value.code, cap.out, cap.err


def _rejected(summary) -> int:
    return sum(summary["expected_rejects"].values())


def _kept_column(out: Path, column: str):
    df = pd.read_parquet(out / "stats.parquet")
    return df[df["decision"] == "kept"][column].dropna().astype(float).to_numpy()


def test_the_worse_version_fails_the_gate_with_the_expected_differences(versions, tmp_path, capsys):
    _, v = versions
    (a, sa), (b, sb) = v["a"], v["b"]
    code, _, err = _compare(capsys, str(a), str(b), "--out", str(tmp_path / "c"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("gate failed: reject rate ")
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert doc["counts"]["n_in"] == {"old": N, "new": N, "delta": 0}
    assert doc["counts"]["n_kept"] == {"old": sa["expected_kept"], "new": sb["expected_kept"],
                                       "delta": sb["expected_kept"] - sa["expected_kept"]}
    assert doc["rates"]["reject_rate"]["delta"] == pytest.approx((_rejected(sb) - _rejected(sa)) / N)
    dups = [sum(s["expected_rejects"].get(r, 0) for r in DUPLICATES) for s in (sa, sb)]
    assert doc["rates"]["duplicate_rate"]["delta"] == pytest.approx((dups[1] - dups[0]) / N)
    reasons = set(sa["expected_rejects"]) | set(sb["expected_rejects"])
    assert set(doc["reasons"]) == reasons
    worse = []
    for r in reasons:
        old, new = sa["expected_rejects"].get(r, 0), sb["expected_rejects"].get(r, 0)
        row = doc["reasons"][r]
        assert (row["old"], row["new"]) == (old, new) and row["delta"] == pytest.approx((new - old) / N)
        if (new - old) / N > 0.01:
            worse.append(r)
    violations = doc["gate"]["violations"]
    assert doc["gate"]["passed"] is False and violations[0].startswith("reject rate ")
    assert sorted(v.split(" rate ")[0] for v in violations if " rate " in v and v.split()[0] in reasons) \
        == sorted(worse)
    # the clean samples are drawn the same way in both versions: no distribution shifts
    assert {s["column"] for s in doc["shifts"]} == {"width", "height", "aspect", "image_bytes", "caption_chars"}
    for s in doc["shifts"]:
        ref = ks_2samp(_kept_column(a, s["column"]), _kept_column(b, s["column"]))
        assert s["ks"] == pytest.approx(ref.statistic, abs=1e-4) and not s["shifted"]
        n, m = s["n_old"], s["n_new"]
        critical = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt((n + m) / (n * m))
        assert s["threshold"] == pytest.approx(max(0.1, critical), abs=1e-4)
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "**FAILED" in md and all(f"- {v}" in md for v in violations) and len(md) < 65_536
    assert re.search(r"\| reject rate \| [\d.]+% \| [\d.]+% \| \*\*\+[\d.]+ pts\*\* \|", md)
    page = (tmp_path / "c" / "index.html").read_text()
    assert 'class="violation" data-row="reject rate"' in page and page.count("<svg") == len(doc["shifts"])
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_a_better_or_the_same_version_passes(versions, tmp_path, capsys):
    _, v = versions
    (a, _), (b, _) = v["a"], v["b"]
    code, out, _ = _compare(capsys, str(b), str(a), "--out", str(tmp_path / "ba"))
    gate = json.loads((tmp_path / "ba" / "compare.json").read_text())["gate"]
    assert code == 0 and "gate passed" in out and gate["passed"] is True and gate["violations"] == []
    code, _, _ = _compare(capsys, str(a), str(a), "--out", str(tmp_path / "aa"))
    same = json.loads((tmp_path / "aa" / "compare.json").read_text())
    assert code == 0 and same["expectations"] == [] and same["expectations_compared"] is True
    assert all(r["delta"] == 0 for r in [*same["counts"].values(), *same["rates"].values(), *same["reasons"].values()])
    assert all(s["ks"] == 0 and not s["shifted"] for s in same["shifts"])
    # the gate is configurable (params.yaml's data.compare section): lenient limits let the worse version pass
    (tmp_path / "p.yaml").write_text("data:\n  compare:\n    gate: {max_reject_rate_increase: 0.5, "
                                     "max_reason_rate_increase: 0.5, max_decode_failure_rate_increase: 0.5}\n")
    code, _, _ = _compare(capsys, str(a), str(b), "--out", str(tmp_path / "k"), "--config", str(tmp_path / "p.yaml"),
                          "--section", "data.compare")
    assert code == 0
    code, _, _ = _compare(capsys, str(a), str(b), "--out", str(tmp_path / "n"), "--no-gate")
    assert code == 0 and "FAILED" in (tmp_path / "n" / "compare.md").read_text()


def test_bad_input_is_one_line_naming_the_file_or_field(versions, tmp_path, capsys):
    _, v = versions
    a = str(v["a"][0])
    code, _, err = _compare(capsys, a, str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no metrics.json (not a filter output of " \
                                        "`fusedit data filter`?)"
    (tmp_path / "bad.yaml").write_text("gate: {max_reject_rate_increase: 2}\n")
    code, _, err = _compare(capsys, a, a, "--out", str(tmp_path / "x"), "--config", str(tmp_path / "bad.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'gate.max_reject_rate_increase'" in err
    code, _, err = _compare(capsys, "data/filtered", a, "--out", str(tmp_path / "x"), "--rev", "HEAD~1",
                            "--repo", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "revision 'HEAD~1'" in err


def _run(cmd, cwd, env=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _short_sides(shards: Path) -> list[int]:
    """Short side of every clean sample, read from the shards (the json member records the defect)."""
    sides = []
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as t:
            members = {m.name: m for m in t.getmembers()}
            for name, m in members.items():
                if name.endswith(".json") and json.load(t.extractfile(m))["defect"] is None:
                    img = Image.open(t.extractfile(members[name[:-4] + "image.jpg"]))
                    sides.append(min(img.size))
    return sides


@pytest.mark.slow
def test_a_changed_filter_threshold_between_dvc_revisions(versions, tmp_path, capsys, monkeypatch):
    root, v = versions
    repo = tmp_path / "repo"
    repo.mkdir()
    env = cli_env()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]
    stage = {"cmd": f"fusedit data filter --input {root / 'synth-a'} --output data/filtered --config params.yaml "
                    "--section data.filter",
             "params": ["data.filter"], "outs": ["data/filtered/stats.parquet", "data/filtered/report",
                                                 "data/filtered/shards", "data/filtered/rejects.jsonl"],
             "metrics": ["data/filtered/metrics.json"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"filter": stage}}))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo, env)
    for filt in ({"workers": 1}, {"workers": 1, "min_side": 240, "quality": {"max_reject_rate": 0.2}}):
        (repo / "params.yaml").write_text(yaml.safe_dump({"data": {"filter": filt}}))
        _run(["dvc", "repro", "-q"], repo, env)
        _run([*git, "add", "-A"], repo)
        _run([*git, "commit", "-qm", "filter"], repo)
    monkeypatch.chdir(repo)
    code, _, err = _compare(capsys, "--rev", "HEAD~1", "--out", str(tmp_path / "c"))
    assert code == 1 and len(err.strip().splitlines()) == 1
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert doc["old"] == "data/filtered@HEAD~1" and doc["new"] == "data/filtered"
    sa = v["a"][1]
    small = sum(side < 240 for side in _short_sides(root / "synth-a"))
    assert doc["reasons"]["too_small"]["old"] == sa["expected_rejects"]["too_small"]
    assert doc["reasons"]["too_small"]["new"] >= sa["expected_rejects"]["too_small"] + small > 40
    shifted = {s["column"]: s for s in doc["shifts"] if s["shifted"]}
    assert {"width", "height"} <= set(shifted)
    old_h = _kept_column(v["a"][0], "height")  # the same inputs and defaults as the HEAD~1 output
    new_h = _kept_column(repo / "data" / "filtered", "height")
    assert shifted["height"]["ks"] == pytest.approx(ks_2samp(old_h, new_h).statistic, abs=1e-4)
    assert {"old_name": "reject rate <= 0.3", "new_name": "reject rate <= 0.2", "old": True, "new": False} \
        in doc["expectations"]
    assert "expectation 'reject rate <= 0.2' now fails" in err
    code, _, _ = _compare(capsys, "--rev", "HEAD~1", "--new-rev", "HEAD", "--out", str(tmp_path / "c2"))
    again = json.loads((tmp_path / "c2" / "compare.json").read_text())
    assert code == 1 and {**again, "new": "data/filtered"} == doc


def test_kfp_components_compile_with_typed_outputs(tmp_path):
    from fusedit.pipelines.data import compile_pipelines

    paths = compile_pipelines(str(tmp_path))
    spec = yaml.safe_load(Path(paths["compare"]).read_text())
    outs = spec["components"]["comp-compare-op"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outs.items()} == {
        "report": "system.HTML", "summary": "system.Markdown", "differences": "system.Artifact",
        "metrics": "system.Metrics"}
    filt = yaml.safe_load(Path(paths["filter"]).read_text())
    assert "baseline_uri" in filt["root"]["inputDefinitions"]["parameters"]
    assert "compare-op" in json.dumps(filt["components"])  # compare against a baseline when one is given


@pytest.fixture
def kfp_local(tmp_path, monkeypatch):
    """kfp.local in-process subprocess runner, run from tmp_path, with its pipeline root at tmp_path/root."""
    from kfp import local

    monkeypatch.chdir(tmp_path)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_kfp_local_compare_step_reports_and_stops_on_the_gate(versions, tmp_path, kfp_local):
    from fusedit.pipelines.data import compare_pipeline

    _, v = versions
    compare_pipeline(old_uri=str(v["a"][0]), new_uri=str(v["b"][0]), gate=False)
    (doc_file,) = (tmp_path / "root").glob("*/compare-op/differences")
    doc = json.loads(doc_file.read_text())
    assert doc["counts"]["n_kept"]["new"] == v["b"][1]["expected_kept"] and doc["gate"]["passed"] is False
    assert "Data compare: **FAILED" in next((tmp_path / "root").glob("*/compare-op/summary")).read_text()
    with pytest.raises(RuntimeError):
        compare_pipeline(old_uri=str(v["a"][0]), new_uri=str(v["b"][0]), gate=True)


def test_the_workflow_compares_against_a_baseline_before_caching(tmp_path):
    """The whole-workflow pipeline takes `baseline_uri` (the data the last model was trained on) and
    `compare_config` (params.yaml's data.compare), and its cache step waits for the compare step's gate."""
    from fusedit.pipelines.workflow import build, compile_checked

    spec = next(yaml.safe_load_all(Path(compile_checked(build(), str(tmp_path / "wf.yaml"))).read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["baseline_uri"]["defaultValue"] == ""
    assert "ks_alpha" in params["compare_config"]["defaultValue"]
    assert "baseline_rev" not in params["compare_config"]["defaultValue"]
    tasks = spec["root"]["dag"]["tasks"]
    (cmp_name,) = [n for n, t in tasks.items() if t["taskInfo"]["name"] == "compare"]
    cmp = tasks[cmp_name]
    assert cmp["inputs"]["parameters"]["old_uri"]["componentInputParameter"] == "baseline_uri"
    assert cmp["inputs"]["artifacts"]["new"]["taskOutputArtifact"]["producerTask"] == "filter-op"
    (cache,) = [t for t in tasks.values() if t["taskInfo"]["name"] == "cache"]
    assert cmp_name in cache["dependentTasks"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_kfp_local_compare_op_with_a_baseline_uri_or_none(versions, tmp_path, kfp_local):
    from kfp import dsl
    from kfp.dsl import Dataset

    from fusedit.components.data.component import compare_op

    _, v = versions

    def pipeline(baseline_uri, new_uri):
        new = dsl.importer(artifact_uri=new_uri, artifact_class=Dataset, reimport=False)
        compare_op(new=new.output, old_uri=baseline_uri, gate=False)

    pipeline.__annotations__ = {"baseline_uri": str, "new_uri": str}  # types, not this module's postponed strings
    against = dsl.pipeline(pipeline)

    against(baseline_uri=str(v["a"][0]), new_uri=str(v["b"][0]))
    (doc_file,) = (tmp_path / "root").glob("*/compare-op/differences")
    doc = json.loads(doc_file.read_text())
    assert doc["old"] == str(v["a"][0]) and doc["gate"]["passed"] is False
    assert doc["counts"]["n_in"]["old"] == doc["counts"]["n_in"]["new"] == N
    against(baseline_uri="", new_uri=str(v["b"][0]))
    notes = [json.loads(p.read_text()) for p in (tmp_path / "root").glob("*/compare-op/differences")]
    assert any(d.get("baseline", "x") is None and d["gate"]["passed"] for d in notes)
