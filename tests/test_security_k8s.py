"""Containers and cluster objects run with least privilege, checked on the rendered manifests.

Every pod the manifests can create (the training-job templates, filled) runs as the images' non-root user,
drops all capabilities, cannot escalate, has a read-only root filesystem whose writable places are exactly
the mounted emptyDirs, and mounts no API token. RBAC is one namespaced Role whose rules are the Kubernetes
API calls the steps make (found in pipelines/), nothing more. These are the checks `checkov` would make for
these objects (it is not a dependency: installing it would change pinned versions of the main environment).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_k8s import EXAMPLE, K8S, OVERLAYS, by_kind, kustomize, needs_kubectl, one, render

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
# kubernetes-client methods -> (apiGroup or "custom", resource or "custom", verb)
API_CALLS = {
    "create_namespaced_custom_object": "create", "get_namespaced_custom_object": "get",
    "list_namespaced_custom_object": "list", "delete_namespaced_custom_object": "delete",
    "patch_namespaced_custom_object": "patch", "replace_namespaced_custom_object": "update",
    "list_namespaced_pod": ("pods", "list"), "read_namespaced_pod": ("pods", "get"),
    "read_namespaced_pod_log": ("pods/log", "get"), "delete_namespaced_pod": ("pods", "delete"),
    "Watch": "watch",
}
CRDS = {("jobset.x-k8s.io", "jobsets"), ("trainer.kubeflow.org", "trainjobs"), ("kubeflow.org", "pytorchjobs")}


def image_user(dockerfile: Path) -> tuple[int, int, dict[str, str], str]:
    """(uid, gid, ENV of the final stage, WORKDIR) of an image, read from its Dockerfile."""
    final = dockerfile.read_text().split("\nFROM ")[-1]
    text = final.replace("\\\n", " ")
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)[-1:]
    uid, gid = (int(x) for x in user.split(":"))
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV\s+(.*)$", text, re.M))))
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    return uid, gid, env, workdir


def pods() -> dict[str, dict]:
    """Every pod spec the filled training-job templates create."""
    _, js = render("jobset-tpu.yaml", EXAMPLE)
    _, pj = render("pytorchjob-gpu.yaml", EXAMPLE)
    out = {f"jobset/{rj['name']}": rj["template"]["spec"]["template"]["spec"] for rj in js["spec"]["replicatedJobs"]}
    out |= {f"pytorchjob/{k}": v["template"]["spec"] for k, v in pj["spec"]["pytorchReplicaSpecs"].items()}
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(dockerfile):
    uid, gid, _, _ = image_user(dockerfile)
    assert uid >= 10000 and gid >= 10000, "a non-root UID outside the host's range"


@pytest.mark.parametrize("name", sorted(pods()))
def test_training_pods_least_privilege(name):
    spec = pods()[name]
    psc = spec["securityContext"]
    uids = {image_user(d)[0] for d in DOCKERFILES}
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] in uids and psc["runAsGroup"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), key
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is not True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("runAsUser", psc["runAsUser"]) != 0
        for e in c.get("env", []):  # storage credentials only ever come from the Secret
            assert not e["name"].startswith("AWS_") or "valueFrom" in e, e["name"]


@pytest.mark.parametrize("name", sorted(pods()))
def test_read_only_root_leaves_every_written_path_on_a_volume(name):
    """/tmp, HF_HOME and the image's WORKDIR (and the job's scratch and shm) are emptyDir mounts."""
    spec = pods()[name]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: volumes[m["volumeName"] if "volumeName" in m else m["name"]] for m in c["volumeMounts"]}
    assert all("emptyDir" in v for v in mounts.values()), "writable places are per-pod emptyDirs"
    needed = {"/tmp", "/dev/shm", "/scratch"}
    for d in DOCKERFILES:
        _, _, env, workdir = image_user(d)
        needed |= {workdir, env["HF_HOME"]}
    for path in needed:
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is not writable"
    assert "$${TMPDIR:-/tmp}" in c["command"][2] or "${TMPDIR:-/tmp}" in c["command"][2]


def used_rules() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every Kubernetes API call in pipelines/ (CRD calls: each CRD kind)."""
    out = set()
    for f in (ROOT / "pipelines").rglob("*.py"):
        for method in re.findall(r"\.(\w+)\(", f.read_text()):
            what = API_CALLS.get(method)
            if isinstance(what, tuple):
                out.add(("", *what))
            elif what:
                out |= {(g, r, what) for g, r in CRDS}
    return out


@needs_kubectl
@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_rbac_is_namespaced_and_exactly_the_calls_made(target):
    docs = kustomize(K8S / target if target == "base" else K8S / "overlays" / target)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role = one(docs, "Role")
    granted = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not {"secrets", "configmaps", "roles", "rolebindings"} & set(rule["resources"]), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    used = used_rules()
    assert used, "no Kubernetes API call found in pipelines/"
    assert granted == used, f"granted, unused: {sorted(granted - used)}; used, not granted: {sorted(used - granted)}"
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == "fusedit"
