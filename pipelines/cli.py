"""`fusedit pipeline`: compile the workflow, submit it to a KFP server, or run the whole DAG locally.

kfp.Client contacts the server as soon as it is built, so it is built only inside `submit`.
"""
import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import typer

from fusedit.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


RESOURCES_HELP = ("STEP=CPU,MEMORY requests of a step's pods over the defaults of pipelines/resources.py, "
                  "e.g. train=16,128Gi (repeatable; leave a part empty to keep its default)")


def _options(variant: str, image: str | None, tpu_image: str | None, params: Path, secret: str, nodes: int = 1,
             resources: list[str] | None = None):
    from fusedit.pipelines.resources import parse
    from fusedit.pipelines.workflow import VARIANTS, Options

    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)} (got '{variant}')")
    if not params.is_file():
        raise UserError(f"params file not found: {params}")
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1 (got {nodes})")
    o = Options(variant=variant, params=str(params), secret=secret, nodes=nodes, resources=parse(resources or []))
    if image:
        o.image = image
    if tpu_image:
        o.tpu_image = tpu_image
    return o


@app.command("compile")
def compile_(
    out: Path = typer.Option(..., help="where to write the compiled pipeline YAML"),
    variant: str = typer.Option("gpu", help="gpu or tpu (training steps on a TPU slice, torch-xla trainer)"),
    image: str = typer.Option(None, help="image for every step, name:tag or name@sha256:digest "
                                         "(default: fusedit.components.shared.image.IMAGE)"),
    tpu_image: str = typer.Option(None, help="image for the TPU training steps (default: image.TPU_IMAGE)"),
    params: Path = typer.Option(Path("params.yaml"), help="stage list and run-parameter defaults"),
    secret: str = typer.Option("fusedit-storage", help="Kubernetes Secret holding the storage credentials"),
    nodes: int = typer.Option(1, help="GPU nodes / TPU hosts per training stage; above 1 each training task "
                                      "creates a PyTorchJob (gpu) or JobSet (tpu) and awaits it"),
    resources: list[str] = typer.Option([], help=RESOURCES_HELP),
) -> None:
    """Compile the whole workflow to KFP IR YAML."""
    from fusedit.pipelines.workflow import compile_workflow

    compile_workflow(str(out), _options(variant, image, tpu_image, params, secret, nodes, resources))
    typer.echo(f"wrote {out}")
    echo_required(str(out))


def echo_required(package: str) -> None:
    """List the run parameters a submit of `package` must pass (the inputs of its evaluation suites)."""
    from fusedit.pipelines.eval_inputs import check_package

    todo = check_package(package)
    if todo:
        typer.echo("required at submit (the evaluation suites' inputs):")
        for line in todo:
            typer.echo(f"  {line}")


def _param(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"--param must be KEY=VALUE (got '{item}')")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# KFP IR parameter types -> the JSON values a run argument of that type may take, and their name in errors
_KINDS = {
    "STRING": ((str,), "a string"), "NUMBER_INTEGER": ((int,), "an integer"),
    "NUMBER_DOUBLE": ((int, float), "a number"), "BOOLEAN": ((bool,), "true or false"),
    "LIST": ((list,), "a JSON list"), "STRUCT": ((dict,), "a JSON object"),
}


def check_arguments(package: str, arguments: dict[str, object]) -> None:
    """Every --param names a parameter of the compiled pipeline and has its type, every required one is given, and
    every evaluation suite the run will use has its inputs (else the server, or the run's last step, fails later)."""
    from fusedit.errors import read_yaml
    from fusedit.pipelines.eval_inputs import check

    spec = read_yaml(package, "pipeline package", first_of_many=True)
    try:
        params = spec["root"]["inputDefinitions"]["parameters"]
    except (TypeError, KeyError):
        raise UserError(f"{package}: not a compiled KFP pipeline (no root.inputDefinitions)") from None
    _check_types(params, arguments)
    check(params, arguments, at_submit=True)  # a suite without its input would fail after all the training
    for key, spec_ in params.items():
        if key not in arguments and "defaultValue" not in spec_ and not spec_.get("isOptional"):
            raise UserError(f"--param {key}: a required run parameter of the pipeline; pass --param {key}=VALUE")


def _check_types(params: dict, arguments: dict[str, object]) -> None:
    import math

    for key, value in arguments.items():
        if key not in params:
            raise UserError(f"--param {key}: not a parameter of the pipeline (known: {', '.join(sorted(params))})")
        types, wanted = _KINDS.get(params[key].get("parameterType", "STRING"), ((object,), "any value"))
        ok = isinstance(value, types)
        if isinstance(value, bool) and bool not in types:
            ok = False
        if isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise UserError(f"--param {key}: expected {wanted}, got {value!r}")


@contextlib.contextmanager
def _kfp_errors(host: str):
    """An unreachable server or a refusal (auth, validation) is the user's to fix: one line naming the host."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise UserError(f"KFP API at {host} refused the request: HTTP {exc.status} {exc.reason}") from None
    except (HTTPError, ConnectionError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot reach the KFP API at {host}: {reason}") from None


@app.command("submit")
def submit(
    host: str = typer.Option(..., help="KFP API endpoint, e.g. http://localhost:8080"),
    experiment: str = typer.Option("fusedit", help="experiment to file the run under (created if missing)"),
    run_name: str = typer.Option(None, help="display name of the run"),
    param: list[str] = typer.Option([], help="run parameter KEY=VALUE (VALUE parsed as JSON when it is)"),
    service_account: str = typer.Option("fusedit", help="Kubernetes service account the run's pods use"),
    namespace: str = typer.Option("fusedit", help="namespace of the run (multi-user KFP: your profile)"),
    package: Path = typer.Option(None, help="a compiled pipeline YAML (default: compile now)"),
    variant: str = typer.Option("gpu", help="when compiling: gpu or tpu"),
    image: str = typer.Option(None, help="when compiling: image for every step (name:tag or name@sha256:...)"),
    params: Path = typer.Option(Path("params.yaml"), help="when compiling: the params file"),
    secret: str = typer.Option("fusedit-storage", help="when compiling: the storage Secret's name"),
    resources: list[str] = typer.Option([], help=f"when compiling: {RESOURCES_HELP}"),
) -> None:
    """Submit the workflow as a run. Auth: KFP_TOKEN (a bearer token) from the environment, else kfp's defaults."""
    import kfp

    from fusedit.pipelines.workflow import compile_workflow

    arguments = dict(_param(p) for p in param)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(package) if package else compile_workflow(
            os.path.join(tmp, "workflow.yaml"), _options(variant, image, None, params, secret, resources=resources))
        check_arguments(path, arguments)
        with _kfp_errors(host), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "This client only works with", FutureWarning)  # kfp's version notice
            client = kfp.Client(host=host, namespace=namespace, existing_token=os.environ.get("KFP_TOKEN") or None)
            result = client.create_run_from_pipeline_package(
                path, arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
                service_account=service_account)
    typer.echo(f"run {result.run_id} submitted to {host} (experiment '{experiment}')")


def tiny_params(doc: dict, steps: int, samples: int) -> dict:
    """A copy of a params document shrunk to a run of seconds per step (the stage list kept)."""
    doc = json.loads(json.dumps(doc))
    try:
        doc["data"]["synth"].update(samples=samples, shard_size=max(samples // 2, 1))
        for st in doc["train"]["stages"]:
            st.update(steps=steps, batch_size=4, save_every=steps, log_every=1, sample_every=steps, warmup_steps=0)
        doc["eval"].update(steps=1, batch_size=4, synthetic_per_category=1, images_per_prompt=1)
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"params: needs data.synth, train.stages (a list of mappings) and eval "
                        f"({type(exc).__name__}: {exc})") from None
    return doc


def collect(root: Path, out: Path) -> None:
    """Copy the filter step's outputs from the pipeline root to out/filtered (the `dvc repro` layout)."""
    found = sorted(root.rglob("filter-op/filtered/metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no filter output under {root}")
    shutil.copytree(found[-1].parent, out / "filtered", dirs_exist_ok=True)


@app.command("run-local")
def run_local(
    out: Path = typer.Option(Path("kfp-local"), help="directory for the run (pipeline root + dvc-like layout)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file whose stages and defaults to use"),
    steps: int = typer.Option(3, help="training steps per stage"),
    samples: int = typer.Option(48, help="synthetic samples"),
) -> None:
    """Run the whole DAG on this machine through kfp.local (SubprocessRunner, this venv), tiny recipe."""
    from kfp import local

    from fusedit.errors import read_yaml
    from fusedit.pipelines.workflow import Options, build

    if not params.is_file():
        raise UserError(f"params file not found: {params}")
    doc = tiny_params(read_yaml(params, "params file"), steps, samples)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "root"),
               raise_on_error=True)
    # no retries: on one machine a failed task is reported at once, not after 60 + 120 + 240 s of backoff
    build(Options(params_doc=doc, source="synth", retries=0))(recipe="tiny", device="cpu", cache_dtype="fp32",
                                   train_output_root=str(out / "train"), eval_output_uri=str(out / "eval"))
    collect(out / "root", out)
    typer.echo(f"metrics: {out}/filtered/metrics.json, {out}/train/<stage>/metrics.json, {out}/eval/metrics.json")
