"""A Kubernetes API stand-in on 127.0.0.1 for the training-job launcher (the suite's second and last stand-in).

No API server or training operator can run here, so this implements the few endpoints the launcher calls
(create / get / delete of PyTorchJobs and JobSets, pod list by label, pod log with follow) and plays the
operators' part for real: every pod of a created job becomes a local process running the pod's own command
and args with its env, envFrom (from the ConfigMaps / Secrets given to the server), a TMPDIR of its own, and
the variables the operator injects (PET_* for a PyTorchJob's torchrun; TPU_WORKER_ID for a JobSet's hosts).
A pod finds `fusedit` where the image has it, on PATH: the suite's warm one first (tests/warm.py).
The job's conditions follow the processes' exit codes, as the controllers report them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tests import warm

CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                    r"(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)/log)?$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """One pod of a job: a local process and its log file."""

    def __init__(self, name: str, labels: dict, container: dict, env: dict, root: Path):
        self.name, self.labels, self.container = name, labels, container
        self.log = root / f"{name}.log"
        tmp = root / name
        tmp.mkdir(parents=True)
        full_env = {**os.environ, **env, "TMPDIR": str(tmp), "PATH": warm.cli_env()["PATH"]}
        self.env = full_env
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(container["command"] + container.get("args", []), env=full_env,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)

    @property
    def phase(self) -> str:
        rc = self.proc.poll()
        return "Running" if rc is None else ("Succeeded" if rc == 0 else "Failed")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Job:
    """A created custom object and the pods its operator started."""

    def __init__(self, obj: dict, pods: list[Pod], succeeded: str):
        self.obj, self.pods, self.succeeded = obj, pods, succeeded

    def view(self) -> dict:
        phases = [p.phase for p in self.pods]
        conditions = [{"type": "Created", "status": "True"}]
        if "Failed" in phases:
            bad = next(p for p in self.pods if p.phase == "Failed")
            conditions.append({"type": "Failed", "status": "True", "reason": "PodFailed",
                               "message": f"pod {bad.name} exited with code {bad.proc.returncode}"})
        elif all(p == "Succeeded" for p in phases):
            conditions.append({"type": self.succeeded, "status": "True", "message": "all pods succeeded"})
        else:
            conditions.append({"type": "Running", "status": "True"})
        return {**self.obj, "status": {"conditions": conditions}}


class K8sStandIn:
    """Run with `with K8sStandIn(config_maps, secrets) as api:`; `api.url`, `api.kubeconfig(path)`."""

    def __init__(self, config_maps: dict[str, dict] | None = None, secrets: dict[str, dict] | None = None):
        self.config_maps, self.secrets = config_maps or {}, secrets or {}
        self.jobs: dict[tuple[str, str, str], Job] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization header)
        self.deleted: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="k8s-standin-"))
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> K8sStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for job in self.jobs.values():
            for p in job.pods:
                p.kill()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, token: str = "standin-token") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "step", "user": {"token": token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "step",
                                                         "namespace": "fusedit"}}]}))
        return path

    # ------------------------------------------------------------------ the operators' part
    def _env(self, container: dict) -> dict:
        env = {}
        for ref in container.get("envFrom", []):
            if "configMapRef" in ref:
                env.update(self.config_maps.get(ref["configMapRef"]["name"], {}))
            if "secretRef" in ref:
                env.update(self.secrets.get(ref["secretRef"]["name"], {}))
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        return env

    def _start(self, obj: dict) -> Job:
        name = obj["metadata"]["name"]
        root = self.root / name
        if obj["kind"] == "PyTorchJob":
            specs = obj["spec"]["pytorchReplicaSpecs"]
            roles = [("master", 0, specs["Master"])] + [("worker", i, specs["Worker"])
                                                       for i in range(int(specs.get("Worker", {}).get("replicas", 0)))]
            port = _free_port()
            pods = []
            for rank, (role, i, spec) in enumerate(roles):
                tpl = spec["template"]
                c = tpl["spec"]["containers"][0]
                env = {**self._env(c), "PET_NNODES": str(len(roles)), "PET_NODE_RANK": str(rank),
                       "PET_NPROC_PER_NODE": str(obj["spec"]["nprocPerNode"]), "PET_MASTER_ADDR": "127.0.0.1",
                       "PET_MASTER_PORT": str(port)}
                labels = {**tpl["metadata"]["labels"], "training.kubeflow.org/job-name": name}
                pods.append(Pod(f"{name}-{role}-{i}", labels, c, env, root))
            return Job(obj, pods, "Succeeded")
        if obj["kind"] == "JobSet":
            rj = obj["spec"]["replicatedJobs"][0]
            job_spec = rj["template"]["spec"]
            tpl = job_spec["template"]
            c = tpl["spec"]["containers"][0]
            labels = {**tpl["metadata"]["labels"], "jobset.sigs.k8s.io/jobset-name": name}
            pods = [Pod(f"{name}-{rj['name']}-0-{i}", labels, c, {**self._env(c), "TPU_WORKER_ID": str(i)}, root)
                    for i in range(int(job_spec["parallelism"]))]
            return Job(obj, pods, "Completed")
        raise ValueError(f"unsupported kind {obj['kind']}")

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason, "message": message})

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _record(self) -> None:
                api.requests.append((self.command, self.path, self.headers.get("Authorization", "")))

            def do_POST(self):
                self._record()
                m = CUSTOM.match(urlparse(self.path).path)
                body = self._body()
                if not m or m["name"]:
                    return self._status(404, "NotFound", self.path)
                key = (m["plural"], m["ns"], body["metadata"]["name"])
                with api.lock:
                    if key in api.jobs:
                        return self._status(409, "AlreadyExists", f"{m['plural']} \"{key[2]}\" already exists")
                    api.jobs[key] = api._start(body)
                self._send(201, body)

            def do_GET(self):
                self._record()
                url = urlparse(self.path)
                if m := CUSTOM.match(url.path):
                    job = api.jobs.get((m["plural"], m["ns"], m["name"]))
                    return self._send(200, job.view()) if job else self._status(404, "NotFound", m["name"])
                if m := PODS.match(url.path):
                    query = parse_qs(url.query)
                    return self._log(m["name"], query) if m["name"] else self._pods(query)
                self._status(404, "NotFound", self.path)

            def do_DELETE(self):
                self._record()
                m = CUSTOM.match(urlparse(self.path).path)
                self._body()
                with api.lock:
                    job = api.jobs.pop((m["plural"], m["ns"], m["name"]), None) if m else None
                if job is None:
                    return self._status(404, "NotFound", self.path)
                for p in job.pods:
                    p.kill()
                api.deleted.append(m["name"])
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def _pods(self, query: dict) -> None:
                want = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                items = [{"metadata": {"name": p.name, "labels": p.labels}, "status": {"phase": p.phase}}
                         for job in list(api.jobs.values()) for p in job.pods
                         if all(p.labels.get(k) == v for k, v in want.items())]
                self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

            def _log(self, name: str, query: dict) -> None:
                pod = next((p for job in list(api.jobs.values()) for p in job.pods if p.name == name), None)
                if pod is None:
                    return self._status(404, "NotFound", name)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                follow = query.get("follow", ["false"])[0].lower() in ("true", "1")  # Go's ParseBool
                with open(pod.log, "rb") as f:
                    while True:
                        ended = not follow or pod.proc.poll() is not None  # checked before reading the rest
                        if chunk := f.read():
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                        if ended:
                            break
                        time.sleep(0.1)
                self.wfile.write(b"0\r\n\r\n")

        return Handler
