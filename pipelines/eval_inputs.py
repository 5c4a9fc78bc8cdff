"""The inputs the evaluation suites read, as run parameters of the workflow and ablation pipelines.

A suite that lacks its input stops the evaluation step, which on the cluster runs after every training stage.
So each input is a run parameter of its own (default: the eval config's value, else ""), the inputs of the
compiled suites that have no value are *required* run parameters, and `check` refuses, at compile and at
submit time, a suite whose input is empty or a path on the submitting machine, in one line naming the suite,
the input and the `--param` that passes it. In the pod, `pod_fields` (components/evaluate/pod_inputs.py) puts
the values into the evaluation's config and fetches the Inception weights (the fid suite reads a local file)
from s3:// or http(s)://.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from fusedit.errors import UserError


@dataclass(frozen=True)
class EvalInput:
    name: str  # the EvalConfig field and the run parameter
    suite: str
    what: str
    example: str
    required: bool = True
    schemes: tuple[str, ...] = ("s3://", "https://", "http://")  # besides an absolute path in the pod


INPUTS = (
    EvalInput("geneval_metadata", "geneval", "GenEval's evaluation_metadata.jsonl",
              "s3://bucket/geneval/evaluation_metadata.jsonl"),
    EvalInput("dpg_prompts", "dpg", "DPG-Bench's dpg_bench.csv", "s3://bucket/dpg/dpg_bench.csv"),
    EvalInput("fid_real", "fid", "the reference images as a shard set", "s3://bucket/mjhq/shards/",
              schemes=("s3://",)),
    EvalInput("fid_weights", "fid", "clean-fid's inception-2015-12-05.pt (fetched into the pod)",
              "s3://bucket/weights/inception-2015-12-05.pt"),
    EvalInput("fid_prompts", "fid", "the prompts of a folder of reference images (MJHQ-30K meta_data.json)",
              "s3://bucket/mjhq/meta_data.json", required=False),
    EvalInput("clip_model", "clipscore", "a CLIP model (hub id, or a path in the image)",
              "openai/clip-vit-large-patch14", schemes=()),
)
NAMES = tuple(i.name for i in INPUTS)
BY_NAME = {i.name: i for i in INPUTS}


def split(ev: dict) -> tuple[dict, dict[str, str]]:
    """(the eval config without the inputs, each input's compile-time value or "")."""
    values = {}
    for name in NAMES:
        value = ev.get(name) or ""
        if not isinstance(value, str):
            raise UserError(f"params: eval.{name} must be a string (got {value!r})")
        values[name] = value
    return {k: v for k, v in ev.items() if k not in NAMES}, values


def needed(suites: list, config: dict) -> list[EvalInput]:
    """The inputs `suites` cannot run without (fid's weights only for a learned feature extractor)."""
    from fusedit.components.evaluate.evals import SUITES

    for s in suites:
        if not isinstance(s, str) or s not in SUITES:
            raise UserError(f"eval_suites: unknown suite {s!r} (one of {', '.join(SUITES)})")
    random_features = config.get("fid_features") == "random"
    return [i for i in INPUTS if i.suite in suites and i.required
            and not (i.name == "fid_weights" and random_features)]


def _how(i: EvalInput) -> str:
    return f"pass it as a run parameter: --param {i.name}={i.example}"


def problem(i: EvalInput, value: str) -> str | None:
    """Why `value` cannot feed suite `i.suite` in an evaluation pod (None: it can)."""
    if not value:
        return f"suite {i.suite} needs {i.name} ({i.what}): {_how(i)}"
    if i.schemes and not (value.startswith(i.schemes) or value.startswith("/")):
        return (f"suite {i.suite}: {i.name} {value!r} is not readable from the evaluation pod (use "
                f"{' or '.join(i.schemes)} or an absolute path in the image): {_how(i)}")
    return None


def required(suites: list, config: dict, values: dict[str, str]) -> set[str]:
    """The inputs to compile as required run parameters: needed, and without a compile-time value."""
    return {i.name for i in needed(suites, config) if not values.get(i.name)}


def with_inputs(func, values: dict[str, str], required_names: set[str]):
    """`func` (a pipeline function whose last parameter is `eval_inputs: dict`) as a KFP pipeline function with one
    string parameter per evaluation input instead: default `values[name]`, or none (required) for those in
    `required_names`, which come first (a parameter without default cannot follow one with)."""
    sig = inspect.signature(func)
    base = [p for p in sig.parameters.values() if p.name != "eval_inputs"]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    extra = [inspect.Parameter(n, kind, annotation=str,
                               default=inspect.Parameter.empty if n in required_names else values.get(n, ""))
             for n in NAMES]
    params = [p for p in extra if p.name in required_names] + base + [p for p in extra if p.name not in
                                                                      required_names]
    order = [p.name for p in params]

    def pipeline(*args):  # KFP calls it with one channel per parameter, in the signature's order
        given = dict(zip(order, args, strict=True))
        return func(**{k: v for k, v in given.items() if k not in NAMES}, eval_inputs={n: given[n] for n in NAMES})

    pipeline.__signature__ = sig.replace(parameters=params)
    pipeline.__name__, pipeline.__doc__ = func.__name__, func.__doc__
    return pipeline


def _config(text: object, where: str) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(text) if isinstance(text, str) and text else {}
    except yaml.YAMLError:
        doc = None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: eval_config must be a YAML or JSON mapping")
    return doc


def check(params: dict, arguments: dict, at_submit: bool) -> list[str]:
    """The evaluation problems of a compiled pipeline (`params`: root.inputDefinitions.parameters) run with
    `arguments`: a needed input that is empty or unreadable in the pod; at submit, also one still unset.
    Returns the required inputs still to be given (at compile time: the notes to print)."""
    if "eval_suites" not in params:
        return []
    suites = arguments.get("eval_suites", params["eval_suites"].get("defaultValue", []))
    config = _config(arguments.get("eval_config", params.get("eval_config", {}).get("defaultValue", "")),
                     "--param eval_config" if "eval_config" in arguments else "the pipeline package")
    later = []
    for i in needed(list(suites), config):
        value = arguments[i.name] if i.name in arguments else params.get(i.name, {}).get("defaultValue")
        if i.name not in params or value == "":
            value = config.get(i.name)  # a package whose eval config carries the input itself
            value = value if isinstance(value, str) else ""
        if value is None:  # a required run parameter
            if not at_submit:
                later.append(f"--param {i.name}={i.example}  (suite {i.suite}: {i.what})")
                continue
            value = ""
        reason = problem(i, value)
        if reason:
            raise UserError(reason)
    return later


def check_package(path: str) -> list[str]:
    """`check` on a compiled package with its defaults (compile time): the required inputs still to pass."""
    from fusedit.errors import read_yaml

    spec = read_yaml(path, "pipeline package", first_of_many=True) or {}
    return check(spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}), {}, at_submit=False)
