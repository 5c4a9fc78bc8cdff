"""The whole workflow as ONE KFP v2 pipeline: the DVC DAG (synth -> filter -> tiny -> cache -> train -> evaluate).

Every step is the component its own step folder defines (components/<step>/component.py: data, tiny, cache, train,
evaluate); this module only wires them and places them on the cluster (pipelines/placement.py). What is fixed
when compiling: the variant (`gpu` or `tpu`), the images (a tag or a digest), the stage list (the DAG's shape),
each step's CPU and memory requests (pipelines/resources.py) and the defaults read from params.yaml. What is a
run parameter: the recipe, the data source and its `data_version`, the params YAML texts, accelerator count,
node selector, tolerations and the inputs of the evaluation suites (pipelines/eval_inputs.py: required when a
compiled suite has none).

`data_version` (a DVC rev or a shard-manifest hash) goes into every data-reading task's inputs, so KFP's cache
key changes when the data behind an unchanged URI changes. Training is never cached (resume needs it to run).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from fusedit.components.cache.component import cache_op
from fusedit.components.data.component import compare_op, filter_op, synth_op
from fusedit.components.evaluate.component import evaluate_op
from fusedit.components.shared.image import IMAGE, TPU_IMAGE
from fusedit.components.tiny.component import tiny_op
from fusedit.components.train.component import train_job_op, train_op
from fusedit.components.train.config import TrainParams
from fusedit.errors import UserError, read_yaml
from fusedit.pipelines import eval_inputs as suite_inputs
from fusedit.pipelines import resources
from fusedit.pipelines.placement import (
    GPU,
    GPU_NODE_SELECTOR,
    GPU_TOLERATIONS,
    TPU,
    TPU_NODE_SELECTOR,
    TPU_TOLERATIONS,
    place,
    shm,
)

VARIANTS = ("gpu", "tpu")
SOURCES = ("either", "synth", "uri")
# Keys of the storage Secret (k8s/base/secret-storage.template.yaml), each exposed as the env var of its name.
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FUSEDIT_S3_ENDPOINT")


@dataclass
class Options:
    """Compile-time choices (not run parameters)."""

    variant: str = "gpu"
    image: str = IMAGE
    tpu_image: str = TPU_IMAGE
    params: str = "params.yaml"
    secret: str = "fusedit-storage"
    retries: int = 3
    backoff: str = "60s"
    train_timeout_s: int = 48 * 3600
    step_timeout_s: int = 6 * 3600
    eval_stage: str = ""  # default: the last training stage
    # GPU nodes / TPU hosts per training stage: above 1, each training task creates a PyTorchJob / JobSet
    # (k8s/jobs/) and awaits it; `accelerators` is then per node (GPUs) or per host (TPU chips)
    nodes: int = 1
    # where the shards come from: "either" (synth when source_uri is empty, else import it; chosen at run time),
    # "synth" or "uri". kfp.local (2.17) cannot resolve the OneOf of artifacts "either" compiles to.
    source: str = "either"
    params_doc: dict = field(default_factory=dict)  # loaded from `params` when empty
    # CPU / memory requests per step over resources.DEFAULTS: {"train": {"cpu": "16", "memory": "128Gi"}}
    resources: dict = field(default_factory=dict)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def check_options(opts: Options) -> None:
    """Refuse compile-time choices the cluster would only reject at run time (or never notice)."""
    if opts.variant not in VARIANTS:
        raise UserError(f"variant must be one of {', '.join(VARIANTS)} (got {opts.variant!r})")
    if opts.source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)} (got {opts.source!r})")
    for name in ("image", "tpu_image"):
        resources.check_image(name, getattr(opts, name))
    resources.check(opts.resources)
    if not isinstance(opts.secret, str) or len(opts.secret) > 253 or not _DNS_SUBDOMAIN.match(opts.secret):
        raise UserError(f"secret must be a Kubernetes Secret name (lowercase DNS subdomain; got {opts.secret!r})")
    for name in ("retries", "train_timeout_s", "step_timeout_s", "nodes"):
        value = getattr(opts, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "retries" else 1):
            raise UserError(f"{name} must be a {'non-negative' if name == 'retries' else 'positive'} integer "
                            f"(got {value!r})")
    from kfp.dsl.structures import normalize_time_string

    try:
        backoff = normalize_time_string(opts.backoff)  # KFP's own rule, which the compiler applies later
    except (ValueError, TypeError, AttributeError, KeyError):
        backoff = ""
    if not re.fullmatch(r"\d{1,9}[smhdw]", backoff):
        raise UserError(f"backoff must be a whole number and a unit, such as '60s' or '2m' (got {opts.backoff!r})")


def _params_doc(opts: Options) -> dict:
    doc = opts.params_doc or read_yaml(opts.params, "params file")
    if not isinstance(doc, dict) or not isinstance(doc.get("train"), dict):
        raise UserError(f"params {opts.params}: needs a 'train:' section with the stage list")
    for dotted in ("data", "data.synth", "data.filter", "eval", "model"):
        node: object = doc
        for part in dotted.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise UserError(f"params {opts.params}: '{dotted}' must be a mapping")
    return doc


def _text(value) -> str:
    # one line of JSON (which is YAML): the compiler copies defaults into a header comment, and a multi-line
    # default there would make the compiled file invalid YAML
    return json.dumps(value)


def _number(section: dict, key: str, default, kind):
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise UserError(f"params: data.synth.{key} must be {'an integer' if kind is int else 'a number'} "
                        f"(got {value!r})")
    return kind(value)


def _texts(doc: dict) -> dict:
    """Run-parameter defaults from a params document."""
    synth = doc.get("data", {}).get("synth", {})
    ev, inputs = suite_inputs.split(doc.get("eval", {}))
    recipe, suites = doc.get("model", {}).get("recipe", "tiny"), ev.pop("suites", ["synthetic"])
    if not isinstance(recipe, str) or not recipe:
        raise UserError(f"params: model.recipe must be a recipe name (got {recipe!r})")
    if not isinstance(suites, list) or not all(isinstance(x, str) for x in suites):
        raise UserError(f"params: eval.suites must be a list of suite names (got {suites!r})")
    return {"recipe": recipe,
            "samples": _number(synth, "samples", 2000, int), "seed": _number(synth, "seed", 0, int),
            "shard_size": _number(synth, "shard_size", 500, int),
            "bad_fraction": _number(synth, "bad_fraction", 0.1, float),
            "filter_config": _text(doc.get("data", {}).get("filter", {})),
            "compare_config": _text({k: v for k, v in doc.get("data", {}).get("compare", {}).items()
                                     if k not in ("baseline", "baseline_rev")}),
            "train_params": _text({"train": doc["train"]}),
            "eval_suites": list(suites),
            "eval_config": _text(ev),
            "eval_inputs": inputs,
            "eval_required": suite_inputs.required(suites, ev, inputs)}


def _common(task: dsl.PipelineTask, opts: Options, image: str, timeout_s: int, step: str,
            secret: bool = True) -> dsl.PipelineTask:
    """Image, deadline, the step's CPU / memory requests and (optionally) the storage Secret as env vars."""
    task.set_container_image(image)
    kubernetes.set_timeout(task, timeout_s)
    cpu, memory = resources.requests(step, opts.resources)
    task.set_cpu_request(cpu).set_memory_request(memory)
    if secret:  # optional: with workload identity / IRSA the Secret may be absent
        kubernetes.use_secret_as_env(task, secret_name=opts.secret, secret_key_to_env={k: k for k in SECRET_KEYS},
                                     optional=True)
    return task


def _shards(opts: Options, source_uri, data_version, samples, seed, shard_size, bad_fraction):
    def made():
        return _common(synth_op(samples=samples, seed=seed, shard_size=shard_size, bad_fraction=bad_fraction),
                       opts, opts.image, opts.step_timeout_s, "synth",
                       secret=False).set_display_name("synth").outputs["shards"]

    def given():
        return dsl.importer(artifact_uri=source_uri, artifact_class=Dataset, reimport=False,
                            metadata={"data_version": data_version}).set_display_name("shards").output

    if opts.source == "synth":
        return made()
    if opts.source == "uri":
        return given()
    with dsl.If(source_uri == "", name="embedded-default"):
        a = made()
    with dsl.Else(name="input-shards"):
        b = given()
    return dsl.OneOf(a, b)


def train_stages(opts: Options, stages, *, recipe, cache, params, output_root, overrides, device, data_version,
                 accelerators, node_selector, tolerations) -> dict[str, dsl.PipelineTask]:
    """One training task per stage, each initialised from its upstream's Model, placed on the variant's pool.

    With opts.nodes > 1 the task runs on a CPU node and creates (and follows) a PyTorchJob or JobSet whose pods
    hold the accelerators; the job restarts its own pods (max_restarts), so the task is not retried itself.
    """
    tpu = opts.variant == "tpu"
    trained: dict[str, dsl.PipelineTask] = {}
    for st in stages:
        upstream = trained.get(st.init_from or "")
        common = dict(recipe=recipe, stage=st.name, data="", cache=cache, params=params, output_root=output_root,
                      overrides=overrides, device=device, data_version=data_version,
                      **({"init": upstream.outputs["model"]} if upstream else {}))
        if opts.nodes > 1:
            cpu, memory = resources.requests("train", opts.resources)  # each pod of the job
            task = train_job_op(**common, image=opts.tpu_image if tpu else opts.image,
                                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kind="jobset" if tpu else "pytorchjob",
                                nodes=opts.nodes, accelerators=accelerators, node_selector=node_selector,
                                tolerations=tolerations, max_restarts=opts.retries, timeout_s=opts.train_timeout_s,
                                secret=opts.secret, cpu=cpu, memory=memory)
            trained[st.name] = _common(task.set_display_name(f"train-{st.name}"), opts, opts.image,
                                       opts.train_timeout_s + 600, "train-launcher").set_caching_options(False)
            continue
        task = train_op(**common, processes=1 if tpu else accelerators).set_display_name(f"train-{st.name}")
        _common(task, opts, opts.tpu_image if tpu else opts.image, opts.train_timeout_s, "train")
        trained[st.name] = place(task, accelerators, node_selector, tolerations, resource=TPU if tpu else GPU,
                                 retries=opts.retries, backoff=opts.backoff)
    return trained


def build(opts: Options | None = None):
    """The workflow pipeline function for `opts` (compile it, or call it under kfp.local)."""
    opts = opts or Options()
    check_options(opts)
    doc = _params_doc(opts)
    d = _texts(doc)
    stages = TrainParams.model_validate(doc["train"]).stages
    if not stages:
        raise UserError(f"params {opts.params}: train.stages is empty")
    eval_stage = opts.eval_stage or stages[-1].name
    if eval_stage not in {st.name for st in stages}:
        raise UserError(f"eval_stage '{eval_stage}' is not a declared stage ({', '.join(st.name for st in stages)})")
    tpu = opts.variant == "tpu"
    selector0, tolerations0 = (TPU_NODE_SELECTOR, TPU_TOLERATIONS) if tpu else (GPU_NODE_SELECTOR, GPU_TOLERATIONS)

    def workflow(recipe: str = d["recipe"], source_uri: str = "", data_version: str = "",
                 samples: int = d["samples"], seed: int = d["seed"], shard_size: int = d["shard_size"],
                 bad_fraction: float = d["bad_fraction"], filter_config: str = d["filter_config"],
                 baseline_uri: str = "", compare_config: str = d["compare_config"],
                 train_params: str = d["train_params"], eval_config: str = d["eval_config"],
                 eval_suites: list = d["eval_suites"], overrides: list = [],  # noqa: B006
                 cache_dtype: str = "bf16", train_output_root: str = "", eval_output_uri: str = "",
                 accelerators: int = 4 if tpu else 1, node_selector: dict = selector0,
                 tolerations: list = tolerations0, device: str = "xla" if tpu else "", eval_inputs: dict | None = None):
        shards = _shards(opts, source_uri, data_version, samples, seed, shard_size, bad_fraction)
        filtered = _common(filter_op(shards=shards, config_yaml=filter_config, data_version=data_version),
                           opts, opts.image, opts.step_timeout_s, "filter").set_display_name("filter")
        shm(filtered)
        compared = _common(compare_op(new=filtered.outputs["filtered"], old_uri=baseline_uri,
                                      config_yaml=compare_config), opts, opts.image, opts.step_timeout_s,
                           "compare").set_display_name("compare")  # gates the cache: no features of worse data
        tiny = _common(tiny_op(recipe=recipe, overrides=overrides), opts, opts.image, opts.step_timeout_s, "tiny",
                       secret=False).set_display_name("tiny")
        sets = tiny.outputs["Output"]
        cache = _common(cache_op(filtered=filtered.outputs["filtered"], recipe=recipe, overrides=sets,
                                 dtype=cache_dtype, data_version=data_version), opts, opts.image,
                        opts.step_timeout_s, "cache").set_display_name("cache").after(compared)
        if not tpu:  # on the TPU variant the cache and evaluation run on CPU nodes
            place(cache, 1, node_selector, tolerations)
        trained = train_stages(opts, stages, recipe=recipe, cache=cache.outputs["cache"], params=train_params,
                               output_root=train_output_root, overrides=sets, device=device,
                               data_version=data_version, accelerators=accelerators, node_selector=node_selector,
                               tolerations=tolerations)
        ev = _common(evaluate_op(pipeline=trained[eval_stage].outputs["model"], config_yaml=eval_config,
                                 suites=eval_suites, output_uri=eval_output_uri, **eval_inputs), opts, opts.image,
                     opts.step_timeout_s, "evaluate").set_display_name("evaluate")
        if not tpu:
            place(ev, 1, node_selector, tolerations)

    return dsl.pipeline(name=f"fusedit-workflow-{opts.variant}",
                        description="synth or shards -> filter -> compare (gate) -> tiny -> cache -> training "
                                    "stages -> evaluate")(
        suite_inputs.with_inputs(workflow, d["eval_inputs"], d["eval_required"]))


def compile_checked(pipeline, out: str) -> str:
    """Compile `pipeline` to KFP IR YAML at `out`, then refuse it (and remove it) if its evaluation suites lack
    an input a pod could read (pipelines/eval_inputs.py)."""
    from kfp import compiler

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, out)
    try:
        suite_inputs.check_package(out)
    except UserError:
        Path(out).unlink(missing_ok=True)
        raise
    return out


def compile_workflow(out: str, opts: Options | None = None) -> str:
    """Compile the workflow to KFP IR YAML at `out`."""
    return compile_checked(build(opts), out)
