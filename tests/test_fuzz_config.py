"""Property tests: recipe, params, filter and eval YAML with random types, unknown keys and out-of-range
values, and the pipeline compiler's options, either load or fail as a user error that is one clear line.

The documents are the shipped ones (a recipe, params.yaml) with random mutations at random depths, plus
files that are not YAML mappings at all; the contract is the CLI's: `_user_error_line` classifies the error
as the user's (a UserError or a pydantic ValidationError) and the printed line names what is wrong: every edit
is recorded, and the line must name an edited field (its dotted path or key), the section holding it, the
value put there, or the file, whichever the loader was given. A pydantic error must blame a field the edits
touched (or one inside a section they replaced), not merely print a location.
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
from fusedit.errors import UserError
from fusedit.model.config import RECIPES_DIR, Recipe, load_recipe
from fusedit.pipelines.workflow import Options, compile_workflow
from tests.fuzzing import assert_names_what_is_wrong, dotted, fuzz_case, fuzz_examples

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


Edit = tuple[tuple, object]  # (path of the field edited, the value put there; None for a deletion)
WHOLE: list[Edit] = [((), None)]  # the whole document is random: any field may be the one at fault


@st.composite
def mutated(draw, base: dict, max_mutations: int = 3) -> tuple[dict, list[Edit]]:
    """`base` with 1..max_mutations random edits (a value replaced, a key deleted, or an unknown key added),
    and the edits made."""
    doc, edits = copy.deepcopy(base), []
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
            edits.append((path, parent[path[-1]]))
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
            edits.append((path, None))
        elif isinstance(parent, dict):
            key = draw(st.text(min_size=1, max_size=8))
            parent[key] = draw(VALUES)
            edits.append(((*path[:-1], key), parent[key]))
    return doc, edits


def documents(base: dict, max_mutations: int = 3):
    """(document, edits): `base` mutated, or any random value in its place."""
    return st.one_of(mutated(base, max_mutations), VALUES.map(lambda v: (v, WHOLE)))


def _within(edits: list[Edit], section: tuple) -> list[Edit]:
    """The edits as paths inside `section`; one that replaced or deleted the section (or above it) is ()."""
    out = []
    for path, value in edits:
        if path[:len(section)] == section:
            out.append((path[len(section):], value))
        elif section[:len(path)] == path:
            out.append(((), value))
    return out


def _related(loc: tuple, path: tuple) -> bool:
    """`loc` is the edited field, a field inside an edited (replaced) value, a section holding it, or a field
    beside it (a required field missing from a section the edit created, the other half of a pair)."""
    return loc[:len(path)] == path or path[:len(loc)] == loc or path[:len(loc) - 1] == loc[:-1]


def culprits(exc: BaseException, edits: list[Edit], section: tuple = (), file=None, also=()) -> list[str]:
    """What the error line may name to tell the user what is wrong, given the edits made to the input."""
    inside = _within(edits, section)
    if isinstance(exc, ValidationError):  # shown as "invalid X field 'a.b.0': ..." (fusedit.cli)
        errs = exc.errors()
        loc = tuple(errs[0]["loc"]) if errs else ()
        if loc:  # pydantic blames one field: it must be one the edits touched, named as a dotted path
            return [f"'{dotted(loc)}'"] if any(_related(loc, p) for p, _ in inside) else []
        # a model-wide validator: its message names the edited key or value
        return [k for p, v in inside for k in (p[-1:] + ((v,) if isinstance(v, str | int) else ()))]
    names = [dotted(p[:k]) for p, _ in inside for k in range(1, len(p) + 1)]  # the field or a section above it
    names += [v for _, v in inside if isinstance(v, str | int) and not isinstance(v, bool)]
    if section:
        names.append(dotted(section))
    return [*names, *also, *([str(file)] if file else [])]


def _dump(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True)


FILE_TEXT = st.one_of(st.text(max_size=80), st.sampled_from(["[", "a: [1, 2", ": :", "- 1\n- 2", "42", "~", "\t",
                                                              "!!python/object:os.system {}", "&a [*a]", "{{}}"]))
FILE_BYTES = st.one_of(FILE_TEXT.map(str.encode), st.binary(max_size=40), st.just(b"\xff\xfe\x00bad"))


def assert_user_error(exc: BaseException, culprits_: list[str], context=None) -> str:
    """The CLI shows `exc` as a user error: one line that names one of `culprits_` (what is wrong)."""
    line = _user_error_line(exc)
    assert line is not None, f"bad input treated as an internal error: {type(exc).__name__}: {exc}"
    return assert_names_what_is_wrong(line, culprits_, context)


def _write(tmp: Path, name: str, data: bytes | str) -> Path:
    p = tmp / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


# ---------------------------------------------------------------- recipes

def override_edits(overrides: list[str]) -> tuple[list[Edit], list[str]]:
    """The fields `key=value` overrides edit, and the overrides themselves (a malformed one is named whole)."""
    edits = [(tuple(o.split("=", 1)[0].split(".")), o.split("=", 1)[1]) for o in overrides if "=" in o]
    return edits, [f"'{o.split('=', 1)[0]}'" for o in overrides] + [f"'{o}'" for o in overrides]


@settings(max_examples=fuzz_examples(60))
@given(documents(RECIPE), st.lists(st.text(max_size=20), max_size=3))
def test_recipe_yaml_and_overrides(tmp_path_factory, doc_edits, overrides):
    fuzz_case()
    doc, edits = doc_edits
    path = _write(tmp_path_factory.mktemp("r"), "r.yaml", _dump(doc))
    try:
        assert isinstance(load_recipe(str(path), overrides), Recipe)
    except (UserError, ValidationError) as exc:
        over, named = override_edits(overrides)
        assert_user_error(exc, culprits(exc, edits + over, file=path, also=named), (edits, overrides))


@settings(max_examples=fuzz_examples(40))
@given(FILE_BYTES, st.sampled_from(["r.yaml", "r.yml"]))
def test_recipe_files_that_are_not_mappings(tmp_path_factory, data, name):
    fuzz_case()
    path = _write(tmp_path_factory.mktemp("r"), name, data)
    try:
        load_recipe(str(path))
    except (UserError, ValidationError) as exc:
        assert_user_error(exc, culprits(exc, WHOLE, file=path), data)


@pytest.mark.parametrize("base", ["true", "5", "fusedit/nope", "gone.yaml", "''"])
def test_a_bad_base_names_the_recipe_file_and_field(tmp_path, base):
    """Found by the fuzz above: `base: true` was "recipe name must be a non-empty string (got True)"."""
    path = _write(tmp_path, "r.yaml", f"base: {base}\nmodel: {{patch_size: 2}}\n")
    if base == "''":  # an empty base is no base
        assert isinstance(load_recipe(str(path)), Recipe)
        return
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    shown = assert_user_error(info.value, [f"recipe {path}: base: "])
    assert shown.startswith(f"recipe {path}: base: "), shown


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
        edits, named = override_edits(overrides)
        assert_user_error(exc, culprits(exc, edits, also=named), overrides)


# ---------------------------------------------------------------- params: train, filter, eval sections

def _section(name: str) -> tuple:
    return tuple(name.split("."))


@settings(max_examples=fuzz_examples(60))
@given(documents(PARAMS, 4), st.sampled_from(["train", "eval", "data.filter", "nope", "train.x"]))
def test_params_sections(tmp_path_factory, doc_edits, section):
    fuzz_case()
    doc, edits = doc_edits
    path = _write(tmp_path_factory.mktemp("p"), "params.yaml", _dump(doc))
    train = section if section.startswith("train") else "train"
    other = "data.filter" if section == "train" else section
    eval_ = "eval" if section == "train" else section
    loaders = [(lambda: load_train_params(path, train), TrainParams, train, "train"),
               (lambda: load_filter_config(str(path), other), FilterConfig, other, "data.filter"),
               (lambda: load_eval_config(str(path), eval_, pipeline="p", output="o"), EvalConfig, eval_, "eval")]
    for load, kind, sec, own in loaders:
        try:
            assert isinstance(load(), kind)
        except (UserError, ValidationError) as exc:
            # another step's section: any of its fields may be the one named
            wrong = edits if sec == own else WHOLE
            assert_user_error(exc, culprits(exc, wrong, _section(sec), file=path), (sec, edits))


@pytest.mark.parametrize("loader", ["train", "data.filter", "eval"])
@pytest.mark.parametrize("value", [5, [1, 2], "text"])
def test_a_section_that_is_not_a_mapping_is_named(tmp_path, loader, value):
    doc = copy.deepcopy(PARAMS)
    *parents, leaf = loader.split(".")
    parent = doc
    for part in parents:
        parent = parent[part]
    parent[leaf] = value
    path = _write(tmp_path, "params.yaml", _dump(doc))
    load = {"train": lambda: load_train_params(path), "data.filter": lambda: load_filter_config(str(path), loader),
            "eval": lambda: load_eval_config(str(path), loader, pipeline="p", output="o")}[loader]
    with pytest.raises((UserError, ValidationError)) as info:
        load()
    assert_user_error(info.value, [str(path), f"'{loader}'"], (loader, value))


@settings(max_examples=fuzz_examples(30))
@given(FILE_BYTES)
def test_params_files_that_are_not_yaml_mappings(tmp_path_factory, data):
    fuzz_case()
    path = _write(tmp_path_factory.mktemp("p"), "params.yaml", data)
    for load, sec in ((lambda: load_train_params(path), "train"),
                      (lambda: load_filter_config(str(path), "data.filter"), "data.filter"),
                      (lambda: load_eval_config(str(path), pipeline="p", output="o"), "eval")):
        try:
            load()
        except (UserError, ValidationError) as exc:
            assert_user_error(exc, culprits(exc, WHOLE, _section(sec), file=path), (sec, data))


def test_missing_and_directory_params_name_the_path(tmp_path):
    for target in (tmp_path / "absent.yaml", tmp_path):
        for load in (lambda t=target: load_train_params(t), lambda t=target: load_filter_config(str(t)),
                     lambda t=target: load_eval_config(str(t)), lambda t=target: load_recipe(str(t / "x.yaml"))):
            with pytest.raises(UserError) as info:
                load()
            assert_user_error(info.value, [str(target)])


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
@given(st.fixed_dictionaries({}, optional=OPTION_VALUES), st.one_of(st.just((PARAMS, [])), mutated(PARAMS, 3)))
def test_compile_options_and_params(tmp_path_factory, fields, doc_edits):
    fuzz_case()
    doc, edits = doc_edits
    out = tmp_path_factory.mktemp("c") / "wf.yaml"
    try:
        compile_workflow(str(out), Options(params_doc=doc, **fields))
    except (UserError, ValidationError) as exc:
        # the stage list is validated as a `train:` section; the options are named as they are spelled
        options = [((name,), value) for name, value in fields.items()]
        section = ("train",) if isinstance(exc, ValidationError) else ()
        assert_user_error(exc, culprits(exc, edits + options, section), (fields, edits))
        return
    spec = next(yaml.safe_load_all(out.read_text()))
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("samples", "seed", "shard_size", "bad_fraction"):
        value = defaults[name]["defaultValue"]
        assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
