"""Ablation specs: a base recipe, named variants (a recipe or overrides), and what every variant shares.

A spec is checked completely before anything runs: every variant is loaded with `load_recipe`, overrides
must name real `model.*` fields and may not contradict themselves or the recipe the variant chose, names
are unique, and the shared stage/eval/data settings must exist in the params file. Every mistake is one
UserError naming the spec file, the variant and the field.

`runs(spec)` expands the spec into one `Run` per (variant, seed): the `dvc exp run -S` settings of the
local driver and the items of the KFP fan-out are both made from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fusedit.components.ablate.claims import Claim
from fusedit.errors import UserError

NAME = r"^[a-z0-9][a-z0-9_-]*$"  # experiment names end up in git refs and KFP task names


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    recipe: str | None = None  # None: the spec's base recipe
    overrides: dict[str, Any] = {}  # dotted model field -> value, applied on top of the recipe
    description: str = ""
    paper: Claim | None = None  # what the paper found for this change, checked by the report


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    description: str = ""
    base: str  # the base recipe
    reference: str | None = None  # the variant the deltas are measured against (default: the first)
    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    data: dict[str, Any] = {}  # merged into params.yaml `data:` (e.g. synth.samples)
    stages: dict[str, dict[str, Any]] = {}  # training stage name -> Stage fields
    eval: dict[str, Any] = {}  # params.yaml `eval:` fields (suites, synthetic_per_category, ...)

    @property
    def reference_variant(self) -> Variant:
        return next(v for v in self.variants if v.name == (self.reference or self.variants[0].name))


@dataclass(frozen=True)
class Run:
    """One (variant, seed): an experiment locally, one ParallelFor item on the cluster."""

    spec: str
    name: str  # <variant> or <variant>-s<seed> when several seeds run
    variant: str
    seed: int
    recipe: str
    model_overrides: dict[str, Any]  # nested `model:` section overrides

    @property
    def experiment(self) -> str:
        return f"{self.spec}-{self.name}"

    @property
    def set_args(self) -> list[str]:
        """`--set` arguments for `fusedit train` / `cache build`."""
        return [f"{k}={json.dumps(v)}" for k, v in flatten({"model": self.model_overrides}).items()]


class _TrackingLoader(yaml.SafeLoader):
    """A SafeLoader that remembers keys set twice in one mapping instead of silently keeping the last."""


class Tracked(dict):
    dupes: list[tuple[str, Any, Any, int]]


def _construct_mapping(loader: _TrackingLoader, node: yaml.MappingNode) -> Tracked:
    loader.flatten_mapping(node)
    out = Tracked()
    out.dupes = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        value = loader.construct_object(value_node, deep=True)
        if key in out and out[key] != value:
            out.dupes.append((str(key), out[key], value, key_node.start_mark.line + 1))
        out[key] = value
    return out


_TrackingLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"pos_embed": "ape"}} -> {"model.pos_embed": "ape"}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flat_overrides(where: str, raw: Any) -> dict[str, Any]:
    """A variant's overrides (mapping, nested or dotted, or a list of `field=value`) as one flat dict."""
    pairs: list[tuple[str, Any, str]] = []  # (dotted key, value, how it was written)
    if isinstance(raw, list):
        for item in raw:
            if not isinstance(item, str) or "=" not in item:
                raise UserError(f"{where}: override {item!r} must look like model.field=value")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), yaml.safe_load(v), item))
    elif isinstance(raw, dict):
        for d, prefix in _walk(raw):
            for key, old, new, line in getattr(d, "dupes", []):
                raise UserError(f"{where}: override '{prefix}{key}' is set twice ({old!r} and {new!r}, line {line})")
        pairs = [(k, v, k) for k, v in _pairs(raw)]
    elif raw is not None:
        raise UserError(f"{where}: overrides must be a mapping of model.field: value (got {type(raw).__name__})")
    out: dict[str, Any] = {}
    for key, value, _ in pairs:
        if key in out and out[key] != value:
            raise UserError(f"{where}: override '{key}' is set twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _pairs(d: dict, prefix: str = ""):
    """(dotted key, value) of every leaf, repeats kept: `model.x` and `model: {x: ...}` name the same field."""
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _pairs(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _walk(d: dict, prefix: str = ""):
    yield d, prefix
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")


def _recipe_own_fields(name: str) -> dict[str, Any]:
    """The fields a recipe file itself sets (not those inherited through `base:`): what choosing it means."""
    from fusedit.model.config import RECIPES_DIR

    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("base", None)
    return flatten({k: v for k, v in data.items() if k != "name"})


def _pydantic_line(exc: ValidationError) -> tuple[str, str]:
    e = exc.errors()[0]
    return ".".join(str(p) for p in e["loc"]), e["msg"]


def check_variant(spec: Spec, v: Variant, where: str) -> dict[str, Any]:
    """Load the variant's recipe with its overrides (as training will); returns the resolved model fields."""
    from fusedit.model.config import load_recipe

    recipe = v.recipe or spec.base
    for key in v.overrides:
        if not key.startswith("model.") or key == "model.":
            raise UserError(f"{where}: override '{key}': only model.* fields vary between variants "
                            "(flow, data, training and evaluation settings are shared by the whole spec)")
    if v.recipe and v.recipe != spec.base:
        own = _recipe_own_fields(v.recipe) if _known(v.recipe) else {}
        for key, value in v.overrides.items():
            if key in own and own[key] != value:
                raise UserError(f"{where}: override '{key}={value}' contradicts its recipe '{v.recipe}' "
                                f"({key}: {own[key]}); use another recipe, or the base recipe with overrides")
    try:
        r = load_recipe(recipe, dict(v.overrides))
    except UserError as exc:
        raise UserError(f"{where}: recipe: {exc}") from None
    except ValidationError as exc:
        field, msg = _pydantic_line(exc)
        culprit = next((k for k in v.overrides if field.startswith(k) or k.startswith(field)), None)
        what = f"override '{culprit}'" if culprit else f"recipe '{recipe}' field '{field}'"
        raise UserError(f"{where}: {what}: {msg}") from None
    return r.model.model_dump()


def _known(name: str) -> bool:
    from fusedit.model.config import recipe_names

    return name.endswith((".yaml", ".yml")) or name in recipe_names()


def _check_shared(spec: Spec, params: dict, src: str) -> None:
    from fusedit.components.evaluate.config import EvalConfig
    from fusedit.components.train.config import Stage

    stages = {s["name"]: s for s in params.get("train", {}).get("stages", [])}
    for name, fields in spec.stages.items():
        if name not in stages:
            raise UserError(f"{src}: stages.{name}: no such training stage in the params file "
                            f"(declared: {', '.join(stages)})")
        try:
            Stage.model_validate({**stages[name], **fields})
        except ValidationError as exc:
            field, msg = _pydantic_line(exc)
            raise UserError(f"{src}: stages.{name}.{field}: {msg}") from None
    bad = {"pipeline", "output"} & set(spec.eval)
    if bad:
        raise UserError(f"{src}: eval.{sorted(bad)[0]}: set by the driver, not the spec")
    try:
        EvalConfig.model_validate({**params.get("eval", {}), **spec.eval, "pipeline": "-", "output": "-"})
    except ValidationError as exc:
        field, msg = _pydantic_line(exc)
        raise UserError(f"{src}: eval.{field}: {msg}") from None
    data = params.get("data", {})
    for key in flatten(spec.data):
        node = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"{src}: data.{key}: no such field in the params file's data section")
            node = node[part]


def parse_spec(raw: Any, src: str, params: dict | None = None) -> Spec:
    """Validate a spec document completely (recipes, overrides, shared settings) or raise one UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{src}: an ablation spec is a mapping (name, base, variants, ...)")
    for d, prefix in _walk(raw):
        if prefix.startswith("variants") or "overrides" in prefix:
            continue
        for key, old, new, line in getattr(d, "dupes", []):
            raise UserError(f"{src}: '{prefix}{key}' is set twice ({old!r} and {new!r}, line {line})")
    raw = dict(raw)
    variants = raw.get("variants")
    if isinstance(variants, list):
        fixed = []
        for i, v in enumerate(variants):
            if isinstance(v, dict):
                where = f"{src}: variant '{v.get('name', i)}'"
                for key, old, new, line in getattr(v, "dupes", []):
                    raise UserError(f"{where}: '{key}' is set twice ({old!r} and {new!r}, line {line})")
                v = {**v, "overrides": _flat_overrides(where, v.get("overrides"))}
            fixed.append(v)
        raw["variants"] = fixed
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        field, msg = _pydantic_line(exc)
        parts = field.split(".")
        if parts[0] == "variants" and len(parts) > 1 and parts[1].isdigit():
            v = raw["variants"][int(parts[1])]
            name = v.get("name", parts[1]) if isinstance(v, dict) else parts[1]
            raise UserError(f"{src}: variant '{name}' field '{'.'.join(parts[2:]) or 'variant'}': {msg}") from None
        raise UserError(f"{src}: field '{field}': {msg}") from None
    seen: dict[str, int] = {}
    for v in spec.variants:
        if v.name in seen:
            raise UserError(f"{src}: variant '{v.name}' is named twice (variants {seen[v.name]} and "
                            f"{spec.variants.index(v, seen[v.name] + 1)})")
        seen[v.name] = spec.variants.index(v)
    if spec.reference and spec.reference not in seen:
        raise UserError(f"{src}: reference '{spec.reference}' is not a variant (variants: {', '.join(seen)})")
    if spec.reference_variant.paper is not None:
        raise UserError(f"{src}: variant '{spec.reference_variant.name}' field 'paper': the reference variant "
                        "has no claim of its own (claims compare a variant with the reference)")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise UserError(f"{src}: seeds repeat: {spec.seeds}")
    try:
        _ = check_variant(spec, Variant(name="base"), f"{src}: base")
    except UserError as exc:
        raise UserError(str(exc).replace(": base: recipe:", ": base:", 1)) from None
    models: dict[str, str] = {}
    for v in spec.variants:
        where = f"{src}: variant '{v.name}'"
        resolved = json.dumps(check_variant(spec, v, where), sort_keys=True)
        if resolved in models:
            raise UserError(f"{where}: the same model as variant '{models[resolved]}' (same recipe and overrides)")
        models[resolved] = v.name
    if params is not None:
        _check_shared(spec, params, src)
    return spec


def load_spec(path: str | Path, params: str | Path | None = "params.yaml") -> Spec:
    """Read and validate an ablation spec file (and its shared settings against `params`, when it exists)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ablation spec not found: {p}")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_TrackingLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"ablation spec {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    doc = None
    if params is not None and Path(params).is_file():
        doc = yaml.safe_load(Path(params).read_text()) or {}
    return parse_spec(raw, str(p), doc)


def runs(spec: Spec) -> list[Run]:
    """Every (variant, seed) of the spec, in spec order; names carry the seed only when several run."""
    out = []
    for v in spec.variants:
        for seed in spec.seeds:
            name = v.name if len(spec.seeds) == 1 else f"{v.name}-s{seed}"
            out.append(Run(spec.name, name, v.name, seed, v.recipe or spec.base,
                           _nest(v.overrides).get("model", {})))
    return out


def shared_params(spec: Spec, params: dict) -> dict[str, Any]:
    """The params.yaml settings every run of the spec shares, as dotted keys (`train.stages.0.steps`)."""
    out = {f"data.{k}": v for k, v in flatten(spec.data).items()}
    index = {s["name"]: i for i, s in enumerate(params.get("train", {}).get("stages", []))}
    for name, fields in spec.stages.items():
        out.update({f"train.stages.{index[name]}.{k}": v for k, v in fields.items()})
    out.update({f"eval.{k}": v for k, v in spec.eval.items()})
    return out


def apply_params(params: dict, spec: Spec, run: Run) -> dict:
    """A copy of a params document with the spec's shared settings and the run's recipe, overrides and seed."""
    doc = json.loads(json.dumps(params))
    for key, value in {**shared_params(spec, params), **run_params(run)}.items():
        node: Any = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return doc


def run_params(run: Run) -> dict[str, Any]:
    """What differs between runs, as params.yaml keys: recipe, its model overrides (JSON text, all of them for
    training, the feature-changing ones for the cache stage), seed."""
    return {"model.recipe": run.recipe, "model.overrides": json.dumps(run.model_overrides, sort_keys=True),
            "model.cache_overrides": json.dumps(cache_overrides(run.recipe, run.model_overrides), sort_keys=True),
            "train.seed": run.seed}


# ModelConfig fields the cache feature identity (components/cache/format.py: feature_identity) hashes or compares as-is;
# the others reach it only through the text features the DiT reads (TextSpec)
FROZEN_INPUTS = ("llm", "tokenizer", "text_modulation", "vae", "vae_subfolder", "resolution")
SHAPE_LLM = "google/gemma-2b"  # a preset: any LLM config tells whether an override changes the TextSpec


def cache_overrides(recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The model overrides that change the run's feature cache. The rest (timestep conditioning, positions,
    norms, width) leave it the recipe's own, so DVC's run cache hands the variant the cache already built.
    Erring towards "changes it" only costs a rebuild; training refuses a cache whose feature identity differs."""
    from fusedit.model.config import load_recipe, resolve
    from fusedit.model.presets import llm_config

    shapes = llm_config(SHAPE_LLM)
    base = resolve(load_recipe(recipe).model, shapes)[1]
    out = {}
    for key, value in overrides.items():
        if key in FROZEN_INPUTS:
            out[key] = value
            continue
        try:
            same = resolve(load_recipe(recipe, {"model": {key: value}}).model, shapes)[1] == base
        except UserError:
            same = False
        if not same:
            out[key] = value
    return out
