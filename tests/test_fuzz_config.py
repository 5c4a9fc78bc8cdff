"""Property tests: recipe, params, filter and eval YAML with random types, unknown keys and out-of-range
values, and the pipeline compiler's options, either load or fail as a user error that is one clear line.

The documents are the shipped ones (a recipe, params.yaml) with random mutations at random depths, plus
files that are not YAML mappings at all; the contract is the CLI's: `_user_error_line` classifies the error
as the user's (a UserError or a pydantic ValidationError) and the printed line names what is wrong.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fusedit.cli import _user_error_line
from fusedit.components.data.filter_config import FilterConfig, load_filter_config
from fusedit.components.evaluate.config import EvalConfig
from fusedit.components.evaluate.config import load_config as load_eval_config
from fusedit.components.train.config import TrainParams, load_train_params
from fusedit.errors import UserError, one_line
from fusedit.model.config import RECIPES_DIR, Recipe, load_recipe
from fusedit.pipelines.workflow import Options, compile_workflow
from tests.fuzzing import fuzz_case, fuzz_examples

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
RECIPE = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 3),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "..", "/etc/passwd", "s3://", "1e9", "-1", "yes", "null", "{", "\x00"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, base: dict, max_mutations: int = 3) -> dict:
    """`base` with 1..max_mutations random edits: a value replaced, a key deleted, or an unknown key added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["set", "set", "delete", "unknown"]))
        if op == "set":
            parent[path[-1]] = draw(VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
    return doc


def _dump(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True)


FILE_TEXT = st.one_of(st.text(max_size=80), st.sampled_from(["[", "a: [1, 2", ": :", "- 1\n- 2", "42", "~", "\t",
                                                              "!!python/object:os.system {}", "&a [*a]", "{{}}"]))
FILE_BYTES = st.one_of(FILE_TEXT.map(str.encode), st.binary(max_size=40), st.just(b"\xff\xfe\x00bad"))


def assert_user_error(exc: BaseException, *needles: str) -> str:
    """The CLI shows `exc` as a user error (one line) and the line mentions one of `needles` when given."""
    line = _user_error_line(exc)
    assert line is not None, f"bad input treated as an internal error: {type(exc).__name__}: {exc}"
    shown = one_line(line)
    assert shown and "\n" not in shown and "Traceback" not in shown
    return shown


def _write(tmp: Path, name: str, data: bytes | str) -> Path:
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


# ---------------------------------------------------------------- recipes

@settings(max_examples=fuzz_examples(60))
@given(st.one_of(mutated(RECIPE), VALUES), st.lists(st.text(max_size=20), max_size=3))
def test_recipe_yaml_and_overrides(tmp_path_factory, doc, overrides):
    fuzz_case()
    path = _write(tmp_path_factory.mktemp("r"), "r.yaml", _dump(doc))
    try:
        assert isinstance(load_recipe(str(path), overrides), Recipe)
    except (UserError, ValidationError) as exc:
        assert_user_error(exc)


@settings(max_examples=fuzz_examples(40))
@given(FILE_BYTES, st.sampled_from(["r.yaml", "r.yml"]))
def test_recipe_files_that_are_not_mappings(tmp_path_factory, data, name):
    fuzz_case()
    path = _write(tmp_path_factory.mktemp("r"), name, data)
    try:
        load_recipe(str(path))
    except (UserError, ValidationError) as exc:
        assert_user_error(exc)


@settings(max_examples=fuzz_examples(60))
@given(st.lists(st.one_of(st.text(max_size=24), st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(["model", "model.patch_size", "flow.shift", "model.llm", "a..b",
                                              ".x", "model.text_modulation.dim", "flow", "name", "base"]),
    st.text(max_size=10))), max_size=4))
def test_recipe_dotted_overrides(overrides):
    fuzz_case()
    try:
        load_recipe("tiny", overrides)
    except (UserError, ValidationError) as exc:
        assert_user_error(exc)


# ---------------------------------------------------------------- params: train, filter, eval sections

@settings(max_examples=fuzz_examples(60))
@given(st.one_of(mutated(PARAMS, 4), VALUES), st.sampled_from(["train", "eval", "data.filter", "nope", "train.x"]))
def test_params_sections(tmp_path_factory, doc, section):
    fuzz_case()
    path = _write(tmp_path_factory.mktemp("p"), "params.yaml", _dump(doc))
    loaders = [(lambda: load_train_params(path, section if section.startswith("train") else "train"), TrainParams),
               (lambda: load_filter_config(str(path), "data.filter" if section == "train" else section), FilterConfig),
               (lambda: load_eval_config(str(path), "eval" if section == "train" else section, pipeline="p",
                                         output="o"), EvalConfig)]
    for load, kind in loaders:
        try:
            assert isinstance(load(), kind)
        except (UserError, ValidationError) as exc:
            assert_user_error(exc)


@settings(max_examples=fuzz_examples(30))
@given(FILE_BYTES)
def test_params_files_that_are_not_yaml_mappings(tmp_path_factory, data):
    fuzz_case()
    path = _write(tmp_path_factory.mktemp("p"), "params.yaml", data)
    for load in (lambda: load_train_params(path), lambda: load_filter_config(str(path), "data.filter"),
                 lambda: load_eval_config(str(path), pipeline="p", output="o")):
        try:
            load()
        except (UserError, ValidationError) as exc:
            assert_user_error(exc)


def test_missing_and_directory_params_name_the_path(tmp_path):
    for target in (tmp_path / "absent.yaml", tmp_path):
        for load in (lambda t=target: load_train_params(t), lambda t=target: load_filter_config(str(t)),
                     lambda t=target: load_eval_config(str(t)), lambda t=target: load_recipe(str(t / "x.yaml"))):
            with pytest.raises(UserError) as info:
                load()
            assert str(target) in assert_user_error(info.value)


# ---------------------------------------------------------------- the pipeline compiler's options

OPTION_VALUES = {
    "variant": st.sampled_from(["gpu", "tpu", "cpu", "", "GPU"]),
    "image": st.one_of(st.sampled_from(["ghcr.io/x/y:1", "img"]), st.text(max_size=10)),
    "tpu_image": st.one_of(st.just("ghcr.io/x/tpu:1"), st.text(max_size=10)),
    "secret": st.one_of(st.sampled_from(["fusedit-storage", "a.b", "Bad_Name", "-x", ""]), st.text(max_size=10)),
    "retries": st.one_of(st.integers(-2, 5), st.just(True), st.floats(0, 3)),
    "backoff": st.sampled_from(["60s", "1.5s", "60", "s", "-1s", "1m", "2 hours", "1x", "0s"]),
    "train_timeout_s": st.integers(-1, 10**6), "step_timeout_s": st.integers(-1, 10**6),
    "eval_stage": st.sampled_from(["", "base", "joint", "nope"]),
    "source": st.sampled_from(["either", "synth", "uri", "ftp"]),
}


@settings(max_examples=fuzz_examples(40))
@given(st.fixed_dictionaries({}, optional=OPTION_VALUES), st.one_of(st.just(PARAMS), mutated(PARAMS, 3)))
def test_compile_options_and_params(tmp_path_factory, fields, doc):
    fuzz_case()
    out = tmp_path_factory.mktemp("c") / "wf.yaml"
    try:
        compile_workflow(str(out), Options(params_doc=doc, **fields))
    except (UserError, ValidationError) as exc:
        assert_user_error(exc)
        return
    spec = next(yaml.safe_load_all(out.read_text()))
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("samples", "seed", "shard_size", "bad_fraction"):
        value = defaults[name]["defaultValue"]
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
