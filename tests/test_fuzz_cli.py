"""Property tests of the `fusedit` CLI contract on random arguments: exit 0, or a user error that is ONE line
starting with `error:` and exit code 2; never a traceback, never a hang. Internal errors say so.

Most examples call `fusedit.cli.main` in this process (the same code path as the console script, without
the interpreter start-up); a sample runs the installed `fusedit` executable, with non-UTF-8 bytes in argv.
Every command runs in a scratch directory, and arguments are chosen so that a valid combination finishes
quickly (tiny recipes, missing inputs, a refused KFP port).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fusedit.cli import main
from tests.fuzzing import fuzz_case, fuzz_examples, no_hang

ROOT = Path(__file__).resolve().parents[1]
FUSEDIT = str(Path(sys.executable).parent / "fusedit")
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def run_main(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fusedit argv` run in-process; internal errors propagate."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), no_hang(120):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def assert_contract(code: int, out: str, err: str, argv) -> None:
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)  # log lines may come before it
        assert len(errors[0]) > len("error: ") + 5


TEXT = st.text(max_size=16)
RELPATH = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12)
SMALL = st.one_of(st.integers(-5, 5), st.sampled_from(["x", "1.5", ""]))
INTS = st.one_of(SMALL, st.just("99999999999999999999"))
OVERRIDE = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["model.patch_size", "model.dit_num_layers", "model.pos_embed", "model.llm", "flow.shift", "model", "x.y",
     "model.max_prompt_length", "model.initial_layers", "model.fusion"]), st.one_of(TEXT, INTS.map(str)))


@st.composite
def model_args(draw):
    argv = ["model", "summary", "--recipe", draw(st.one_of(st.sampled_from(["tiny", "tiny-shallow", "fusedit/nope",
                                                                          "../x", "a.yaml"]), TEXT))]
    for o in draw(st.lists(st.one_of(OVERRIDE, TEXT), max_size=3)):
        argv += ["--set", o]
    return argv + draw(st.sampled_from([[], ["--json"], ["--bogus"]]))


@st.composite
def data_args(draw):
    cmd = draw(st.sampled_from(["filter", "synth"]))
    if cmd == "synth":
        return ["data", "synth", "--out", draw(RELPATH), "--samples", str(draw(st.one_of(st.just(3), SMALL))),
                "--shard-size", str(draw(st.one_of(st.just(2), INTS))),
                "--bad-fraction", draw(st.sampled_from(["0.5", "0", "-1", "2", "x"]))]
    argv = ["data", "filter"]
    if draw(st.integers(0, 3)):
        argv += ["--input", draw(st.one_of(st.sampled_from(["in", "in/*.tar", "in/{0..3}.tar", "missing"]), TEXT))]
    if draw(st.integers(0, 3)):
        argv += ["--output", draw(RELPATH)]
    if draw(st.booleans()):
        argv += ["--config", draw(st.sampled_from(["cfg.yaml", "missing.yaml", "."]))]
        argv += ["--section", draw(st.one_of(st.sampled_from(["data.filter", "x", "data"]), TEXT))]
    if draw(st.booleans()):
        argv += ["--workers", str(draw(INTS))]
    return argv + ["--no-fail-on-quality"]


@st.composite
def eval_args(draw):
    if draw(st.booleans()):
        return ["eval", "compare", *draw(st.lists(st.sampled_from(["runA", "runB", "runA/metrics.json", "gone"]),
                                                  min_size=1, max_size=3))]
    argv = ["eval", "run", "--pipeline", draw(st.sampled_from(["gone", "runA", "."])), "--output", draw(RELPATH)]
    for opt, values in (("--steps", INTS), ("--dtype", st.sampled_from(["fp32", "fp8", ""])),
                        ("--suite", st.sampled_from(["synthetic", "nope"])), ("--device", TEXT),
                        ("--config", st.sampled_from(["cfg.yaml", "missing.yaml"]))):
        if draw(st.booleans()):
            argv += [opt, str(draw(values))]
    return argv


@st.composite
def train_cache_args(draw):
    if draw(st.booleans()):
        return ["train", "--recipe", draw(st.sampled_from(["tiny", "nope"])), "--stage", draw(TEXT),
                "--data", "gone", "--output", draw(RELPATH), "--params", draw(st.sampled_from(["cfg.yaml", "gone"])),
                "--device", draw(st.sampled_from(["cpu", "garbage", "cuda:9"]))]
    return ["cache", "build", "--input", "gone", "--output", draw(RELPATH), "--recipe",
            draw(st.sampled_from(["tiny", "nope"])), "--dtype", draw(st.sampled_from(["bf16", "fp8"])),
            "--max-bytes", draw(st.one_of(st.sampled_from(["2T", "1e3", "-1", "5 G"]), TEXT))]


@st.composite
def pipeline_args(draw):
    if draw(st.booleans()):
        argv = ["pipeline", "compile", "--out", draw(RELPATH) + ".yaml"]
        argv += ["--variant", draw(st.sampled_from(["gpu", "tpu", "cpu"]))]
        argv += ["--secret", draw(st.one_of(st.just("fusedit-storage"), TEXT))]
        argv += ["--params", draw(st.sampled_from(["params.yaml", "cfg.yaml", "gone.yaml"]))]
        return argv
    argv = ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--package", "wf.yaml"]
    for p in draw(st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
            ["samples", "seed", "recipe", "accelerators", "node_selector", "eval_suites", "bogus", ""]),
            st.sampled_from(["1", "-2", "1.5", "true", "null", "[1]", '{"a": 1}', "NaN", "x", ""])), TEXT),
            max_size=3)):
        argv += ["--param", p]
    return argv


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_dir) -> Path:
    """A directory with what the random arguments point at: shards, a config, eval runs, a package, and the
    tiny recipe's LLM at its default place (data/tiny/llm), so valid recipe overrides really resolve."""
    from fusedit.pipelines.workflow import Options, compile_workflow
    from tests.data_helpers import jpeg, write_tar

    d = tmp_path_factory.mktemp("cli")
    (d / "data" / "tiny").mkdir(parents=True)
    (d / "data" / "tiny" / "llm").symlink_to(tiny_dir / "gemma")
    (d / "in").mkdir()
    write_tar(d / "in" / "0.tar", [(f"k{i}", {"jpg": jpeg(), "synthetic_caption.txt": b"a red box"})
                                   for i in range(3)])
    (d / "in" / "1.tar").write_bytes(b"\x00not a tar")
    (d / "cfg.yaml").write_text("data:\n  filter:\n    min_side: 8\n    workers: 1\n    report: false\n"
                                "train:\n  stages: [{name: base, steps: 1}]\neval: {steps: 0}\n")
    (d / "runA").mkdir()
    (d / "runA" / "metrics.json").write_text(json.dumps({"synthetic": {"score": 0.5, "n": 3}, "x": [1, "a"]}))
    (d / "runB").mkdir()
    (d / "runB" / "metrics.json").write_text('{"synthetic": {"score": "high", "nested": {"a": null}}}')
    (d / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    compile_workflow(str(d / "wf.yaml"), Options(params=str(ROOT / "params.yaml")))
    return d


@settings(max_examples=fuzz_examples(60), suppress_health_check=SLOW_OK)
@given(st.sampled_from([model_args(), data_args(), eval_args(), train_cache_args(), pipeline_args()]).flatmap(
    lambda command: command))  # each command group equally often
def test_cli_in_process(scratch, argv):
    fuzz_case()
    code, out, err = run_main(argv, scratch)
    event(f"{argv[0]} exit {code}")
    assert_contract(code, out, err, argv)


@settings(max_examples=fuzz_examples(6), suppress_health_check=SLOW_OK)
@given(st.lists(st.one_of(st.sampled_from(["model", "summary", "--recipe", "tiny", "--set", "data", "filter",
                                           "--input", "pipeline", "compile", "--json", "--help"]),
                          st.binary(min_size=1, max_size=6)), min_size=1, max_size=5))
def test_cli_executable_with_non_utf8_argv(scratch, words):
    """The real executable, with raw bytes (invalid UTF-8 included) in argv: exit 0/2, one line, no traceback."""
    fuzz_case()
    argv = [w if isinstance(w, bytes) else w.encode() for w in words]
    argv = [a.replace(b"\x00", b"_") for a in argv]  # argv cannot carry NUL
    r = subprocess.run([FUSEDIT.encode(), *argv], capture_output=True, cwd=scratch, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = r.stderr.decode("utf-8", "replace")
    assert_contract(r.returncode, r.stdout.decode("utf-8", "replace"), err, argv)


def test_internal_errors_say_so(scratch, monkeypatch):
    """A bug (not the user's mistake) is reported as an internal error with its traceback, not as exit 2."""
    import fusedit.model.summary as summary

    def broken(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(summary, "summarize", broken)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(ZeroDivisionError):
        main(["model", "summary", "--recipe", "tiny"])
    assert "internal error (ZeroDivisionError)" in err.getvalue()
