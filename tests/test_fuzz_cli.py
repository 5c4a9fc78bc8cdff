"""Property tests of the `fusedit` CLI contract on random arguments: exit 0, or a user error that is ONE line
starting with `error:` and exit code 2; never a traceback, never a hang. Internal errors say so.

Each argument is drawn as valid, built to be invalid, or random (may be either). Arguments with an invalid part
must exit 2 with a line naming what is wrong (the option, its field, its value or the file); all-valid ones
must exit 0; random ones may do either, but an error still names one of the doubtful parts.

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
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fusedit.cli import main
from tests.fuzzing import assert_names_what_is_wrong, fuzz_case, fuzz_examples, no_hang
from tests.warm import REAL

ROOT = Path(__file__).resolve().parents[1]
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


def assert_contract(code: int, out: str, err: str, argv, culprits=(), invalid: bool = False) -> None:
    """Exit 0, or exit 2 with ONE `error:` line (last on stderr) that names one of `culprits` when given;
    `invalid`: the arguments were built to be wrong, so exit 0 is a failure too."""
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    assert code == 2 or not invalid, f"invalid arguments accepted (exit 0): {argv}\n{out[-1000:]}"
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)  # log lines may come before it
        assert len(errors[0]) > len("error: ") + 5
        if culprits:
            assert_names_what_is_wrong(errors[0].removeprefix("error: "), culprits, argv)


class Args:
    """Arguments being drawn, and what an error about them may name: `wrong` for the parts built to be invalid
    (then the command must fail, naming one of them or another doubtful part), `doubt` for random parts that
    may or may not be valid. Arguments with neither are valid: the command must succeed."""

    def __init__(self, *argv: str):
        self.argv, self.wrong, self.doubt = list(argv), [], []

    def add(self, *argv: str, kind: str = "ok", names=()) -> Args:
        """Append `argv`; `kind` is ok, wrong or doubt, and `names` what an error about them would name."""
        self.argv += argv
        if kind != "ok":
            (self.wrong if kind == "wrong" else self.doubt).extend(n for n in names if n)
        return self

    def opt(self, flag: str, value: tuple[str, str], *also: str) -> Args:
        """`flag value`, with value = (text, kind): an error names the flag, its field name, or the value."""
        text, kind = value
        field = flag.lstrip("-")
        return self.add(flag, text, kind=kind, names=(flag, field, field.replace("-", "_"), text, *also))


def ok(*values: str):
    return st.sampled_from(values).map(lambda v: (v, "ok"))


def wrong(*values: str):
    return st.sampled_from(values).map(lambda v: (v, "wrong"))


def doubt(strategy):
    return strategy.map(lambda v: (str(v), "doubt"))


TEXT = st.text(max_size=16)
RELPATH = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12)
OUT = RELPATH.filter(lambda p: p not in (".", "..")).map(lambda p: (p, "ok"))  # a new name in the scratch dir
POSITIVE = st.one_of(st.integers(1, 5).map(lambda n: (str(n), "ok")),  # an --option with min=1
                     st.integers(-5, 0).map(lambda n: (str(n), "wrong")), wrong("x", "1.5", ""))
COUNT = st.one_of(POSITIVE, ok("99999999999999999999"))
FIELDS = ["model.patch_size", "model.dit_num_layers", "model.pos_embed", "model.llm", "flow.shift", "model",
          "model.max_prompt_length", "model.initial_layers", "model.fusion"]


@st.composite
def overrides(draw, args: Args) -> Args:
    """--set options: field=value (fields of the recipe, valid or not), an unknown field, or no `=` at all."""
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*FIELDS, "x.y", None]))
        if key is None:
            o = draw(TEXT.filter(lambda t: "=" not in t))
            args.add("--set", o, kind="wrong", names=[f"'{o}'"])
            continue
        value = draw(st.one_of(TEXT, st.integers(-5, 5).map(str), st.just("99999999999999999999")))
        args.add("--set", f"{key}={value}", kind="wrong" if key == "x.y" else "doubt",
                 names=[f"{key}={value}", key, f"'{key.split('.')[0]}'", value])
    return args


@st.composite
def model_args(draw) -> Args:
    a = Args("model", "summary").opt("--recipe", draw(st.one_of(
        ok("tiny", "tiny-shallow"), wrong("fusedit/nope", "../x", "a.yaml"), doubt(TEXT))))
    draw(overrides(a))
    flag = draw(st.sampled_from([None, "--json", "--bogus"]))
    return a.add(flag, kind="wrong" if flag == "--bogus" else "ok", names=[flag]) if flag else a


@st.composite
def data_args(draw) -> Args:
    if draw(st.booleans()):
        return (Args("data", "synth").opt("--out", draw(OUT)).opt("--samples", draw(st.one_of(ok("3"), POSITIVE)))
                .opt("--shard-size", draw(st.one_of(ok("2"), COUNT)))
                .opt("--bad-fraction", draw(st.one_of(ok("0.5", "0"), wrong("-1", "2", "x")))))
    a = Args("data", "filter")
    if draw(st.integers(0, 3)):
        given = draw(st.one_of(ok("in", "in/*.tar", "in/0.tar in/1.tar"), wrong("missing", "in/{0..3}.tar"),
                               doubt(TEXT)))
        a.opt("--input", given, *(["in/2.tar"] if "{" in given[0] else []))  # the first file the braces miss
    else:
        a.add(kind="wrong", names=["--input", "input"])
    if draw(st.integers(0, 3)):
        a.opt("--output", draw(OUT))
    else:
        a.add(kind="wrong", names=["--output", "output"])
    if draw(st.booleans()):
        a.opt("--config", draw(st.one_of(ok("cfg.yaml"), wrong("missing.yaml", "confdir.yaml"))))
        section = draw(st.one_of(ok("data.filter"), wrong("x", "data"), doubt(TEXT)))
        a.opt("--section", section, "'filter'" if section[0] == "data" else section[0])
    if draw(st.booleans()):
        a.opt("--workers", draw(st.one_of(st.integers(0, 4).map(lambda n: (str(n), "ok")),
                                          st.integers(-5, -1).map(lambda n: (str(n), "wrong")),
                                          wrong("x", "1.5", ""), doubt(st.just("99999999999999999999")))))
    return a.add("--no-fail-on-quality")


@st.composite
def eval_args(draw) -> Args:
    if draw(st.booleans()):
        a = Args("eval", "compare")
        for run in draw(st.lists(st.sampled_from(["runA", "runB", "runA/metrics.json", "gone"]), min_size=1,
                                 max_size=3)):
            a.add(run, kind="wrong" if run == "gone" else "ok", names=[run])
        return a
    a = Args("eval", "run").opt("--pipeline", draw(wrong("gone", "runA", "runB"))).opt("--output", draw(OUT))
    for flag, values in (("--steps", POSITIVE), ("--dtype", st.one_of(ok("fp32"), wrong("fp8", ""))),
                         ("--suite", st.one_of(ok("synthetic"), wrong("nope"))), ("--device", doubt(TEXT)),
                         ("--config", st.one_of(ok("cfg.yaml"), wrong("missing.yaml")))):
        if draw(st.booleans()):
            a.opt(flag, draw(values))
    return a


@st.composite
def train_cache_args(draw) -> Args:
    if draw(st.booleans()):
        return (Args("train").opt("--recipe", draw(st.one_of(ok("tiny"), wrong("nope"))))
                .opt("--stage", draw(doubt(TEXT))).opt("--data", ("gone", "wrong")).opt("--output", draw(OUT))
                .opt("--params", draw(st.one_of(ok("cfg.yaml"), wrong("gone.yaml"))))
                .opt("--device", draw(st.one_of(ok("cpu"), wrong("garbage", "cuda:9")))))
    return (Args("cache", "build").opt("--input", ("gone", "wrong")).opt("--output", draw(OUT))
            .opt("--recipe", draw(st.one_of(ok("tiny"), wrong("nope"))))
            .opt("--dtype", draw(st.one_of(ok("bf16"), wrong("fp8"))))
            .opt("--max-bytes", draw(st.one_of(ok("2T", "5 G"), wrong("-1", "1e3"), doubt(TEXT)))))


@st.composite
def pipeline_args(draw) -> Args:
    if draw(st.booleans()):
        return (Args("pipeline", "compile").opt("--out", (draw(RELPATH) + ".yaml", "ok"))
                .opt("--variant", draw(st.one_of(ok("gpu", "tpu"), wrong("cpu"))))
                .opt("--secret", draw(st.one_of(ok("fusedit-storage"), doubt(TEXT))))
                .opt("--params", draw(st.one_of(ok("params.yaml"), doubt(st.just("cfg.yaml")), wrong("gone.yaml")))))
    # the port refuses connections: every submit fails, at the latest when it reaches the server
    a = Args("pipeline", "submit").opt("--host", ("http://127.0.0.1:9", "wrong")).add("--package", "wf.yaml")
    for p in draw(st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
            ["samples", "seed", "recipe", "accelerators", "node_selector", "eval_suites", "bogus", ""]),
            st.sampled_from(["1", "-2", "1.5", "true", "null", "[1]", '{"a": 1}', "NaN", "x", ""])), TEXT),
            max_size=3)):
        a.opt("--param", (p, "doubt"), p.partition("=")[0], f"'{p}'")
    return a


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
    (d / "confdir.yaml").mkdir()
    (d / "cfg.yaml").write_text("data:\n  filter:\n    min_side: 8\n    workers: 1\n    report: false\n"
                                "train:\n  stages: [{name: base, steps: 1}]\neval: {steps: 1}\n")
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
def test_cli_in_process(scratch, args):
    """Built-invalid arguments exit 2 naming what is wrong; valid ones exit 0; random ones either."""
    fuzz_case()
    code, out, err = run_main(args.argv, scratch)
    event(f"{args.argv[0]} exit {code}")
    assert code == 0 or args.wrong or args.doubt, f"valid arguments refused: {args.argv}: {err[-1000:]}"
    assert_contract(code, out, err, args.argv, args.wrong + args.doubt, invalid=bool(args.wrong))


@settings(max_examples=fuzz_examples(6), suppress_health_check=SLOW_OK)
@given(st.lists(st.one_of(st.sampled_from(["model", "summary", "--recipe", "tiny", "--set", "data", "filter",
                                           "--input", "pipeline", "compile", "--json", "--help"]),
                          st.binary(min_size=1, max_size=6)), min_size=1, max_size=5))
def test_cli_executable_with_non_utf8_argv(scratch, words):
    """The real executable, with raw bytes (invalid UTF-8 included) in argv: exit 0/2, one line, no traceback."""
    fuzz_case()
    argv = [w if isinstance(w, bytes) else w.encode() for w in words]
    argv = [a.replace(b"\x00", b"_") for a in argv]  # argv cannot carry NUL
    r = subprocess.run([REAL.encode(), *argv], capture_output=True, cwd=scratch, timeout=120,
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


def test_main_called_again_in_one_process_registers_nothing_twice(scratch):
    """`main` is called once per command by the fuzz above and the warm server's children: its sub-commands
    are added to the app once, so the hundredth call costs what the first did (the app once grew per call)."""
    import fusedit.cli as cli

    for _ in range(3):
        assert run_main(["eval", "compare", "gone"], scratch)[0] == 2
    groups = [g.name for g in cli.app.registered_groups]
    commands = [c.name for c in cli.app.registered_commands]
    assert sorted(groups) == sorted(cli.GROUPS) and sorted(commands) == sorted(cli.COMMANDS)
