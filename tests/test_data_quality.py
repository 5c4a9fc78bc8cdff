"""The data-quality suite (real Great Expectations), the HTML report in headless Chromium, the gate."""
from __future__ import annotations

import json
import re

import pytest

from fusedit.components.data.filter import QualityGateError, filter_shards
from fusedit.components.data.filter_config import FilterConfig
from fusedit.components.data.synth import synth
from tests.repo_helpers import chromium_dom


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("q-synth")
    return d, synth(str(d), samples=160, seed=11, shard_size=80, bad_fraction=0.2)


@pytest.fixture(scope="module")
def reported(shards, tmp_path_factory):
    d, summary = shards
    out = tmp_path_factory.mktemp("q-out")
    return out, filter_shards(FilterConfig(input=str(d), output=str(out), workers=2)), summary


def test_suite_runs_through_a_checkpoint_and_passes(reported):
    out, result, summary = reported
    assert result.quality_success is True and result.failed_expectations == []
    validation = json.loads((out / "report" / "validation.json").read_text())
    assert validation["success"] is True
    names = [r["expectation_config"]["meta"]["name"] for r in validation["results"]]
    assert "kept keys are unique" in names and "reject rate <= 0.3" in names
    assert validation["statistics"]["evaluated_expectations"] == len(names) >= 12
    docs = out / "report" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    assert docs.exists() and "filtered_shards" in docs.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quality"] == {"success": True, "failed": [], "evaluated": len(names)}


def test_report_page_is_self_contained(reported):
    out, result, _ = reported
    page = (out / "report" / "index.html").read_text()
    assert 'href="gx/uncommitted/data_docs/local_site/index.html"' in page
    assert page.count("<svg") >= 5 and page.count("data:image/jpeg;base64,") >= 10
    assert not re.search(r'src="(?!data:)', page)  # every picture is inline


@pytest.mark.slow
def test_report_in_headless_chromium_shows_the_numbers(reported, tmp_path):
    out, result, summary = reported
    dom = chromium_dom(out / "report" / "index.html", tmp_path / "profile")

    def metric(name):
        m = re.search(rf'data-metric="{re.escape(name)}">([^<]*)<', dom)
        assert m, f"{name} missing from the rendered page"
        return m.group(1)

    assert metric("Input samples") == "160"
    assert metric("Kept") == str(result.n_kept) == str(summary["expected_kept"])
    assert metric("Rejected") == str(result.n_rejected)
    assert metric("Reject rate") == f"{100 * result.n_rejected / 160:.1f}%"
    for reason, n in summary["expected_rejects"].items():
        assert re.search(rf"<th>{reason}</th><td class=\"n\">{n}</td>", dom), reason
    assert "PASSED" in dom and dom.count("<img") >= 10 and dom.count("<svg") >= 5


def test_gate_fails_with_one_line_naming_the_expectation_after_writing_the_report(shards, tmp_path, capsys):
    d, _ = shards
    out = tmp_path / "gated"
    cfg = FilterConfig(input=str(d), output=str(out), workers=2, fail_on_quality=True,
                       quality={"max_reject_rate": 0.05, "max_duplicate_rate": 0.5, "max_decode_failure_rate": 0.5})
    with pytest.raises(QualityGateError) as err:
        filter_shards(cfg)
    assert str(err.value).startswith("data quality gate failed: reject rate <= 0.05")
    assert "expect_column_values_to_be_in_set on decision" in str(err.value)
    assert "duplicate rate" not in str(err.value)
    assert (out / "report" / "index.html").exists() and "FAILED" in (out / "report" / "index.html").read_text()
    assert json.loads((out / "metrics.json").read_text())["quality"]["success"] is False

    from fusedit.cli import main  # the same gate from the command line: exit 2, one line on stderr

    with pytest.raises(SystemExit) as exit_:
        main(["data", "filter", "--input", str(d), "--output", str(out), "--fail-on-quality", "--config",
              str(_write(tmp_path / "g.yaml", "quality: {max_reject_rate: 0.05}\n"))])
    assert exit_.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: data quality gate failed: reject rate")


def _write(path, text):
    path.write_text(text)
    return path
