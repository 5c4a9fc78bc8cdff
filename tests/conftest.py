"""Shared fixtures: tiny local checkpoints built from configs (random weights, saved with save_pretrained)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fusedit.model import tiny
from fusedit.model.config import load_recipe
from tests import warm

# Under pytest-xdist the workers share the machine: each worker, and every process it starts, gets its share
# of the cores as compute threads instead of a pool the size of the machine (2 workers x 2 threads on 2 cores
# oversubscribed every torch op). A test that needs a count of its own sets it in its subprocess environment.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_SHARE))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REF_TIERS = {
    # recipe -> which tiny LLM stands in for its real one
    "gemma-2": "gemma2", "large-scale": "gemma2", "paligemma": "paligemma",
}


@pytest.fixture(scope="session", autouse=True)
def warm_fusedit():
    """`fusedit` run by name (tests.warm.FUSEDIT, DVC stages under tests.warm.cli_env()) forks from one warm
    server per test process instead of importing torch afresh; FUSEDIT_TEST_WARM=0 turns it off."""
    if not warm.ON:
        yield
        return
    with warm.running():
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tok = tiny.build_tokenizer(root / "gemma")
    tiny.build_llm(root / "gemma", "tiny-gemma", vocab_size=len(tok))
    tok.save_pretrained(str(root / "gemma2"))
    tiny.build_llm(root / "gemma2", "tiny-gemma-2", vocab_size=len(tok))
    tok.save_pretrained(str(root / "paligemma"))
    tiny.build_paligemma(root / "paligemma", vocab_size=len(tok))
    tiny.build_clip(root / "clip", vocab_size=len(tok), dim=32)
    tiny.build_vae(root / "vae")
    return root


@pytest.fixture(scope="session")
def filtered(tmp_path_factory) -> Path:
    """48 clean synthetic samples through the real filter: the training tests' data."""
    from fusedit.components.data.filter import filter_shards
    from fusedit.components.data.filter_config import FilterConfig, QualityThresholds
    from fusedit.components.data.synth import synth

    root = tmp_path_factory.mktemp("train-data")
    synth(str(root / "synth"), samples=48, seed=1, shard_size=16, bad_fraction=0.0, short_side=(32, 48))
    filter_shards(FilterConfig(input=str(root / "synth"), output=str(root / "filtered"), min_side=16, workers=1,
                               dedupe_near=False, quality=QualityThresholds(max_duplicate_rate=1.0)))
    return root / "filtered"


def tiny_overrides(name: str, root: Path) -> dict:
    """Shrink a reference recipe to tiny shapes while keeping what makes it that variant."""
    ref = load_recipe(name).model
    family = next((v for k, v in REF_TIERS.items() if name.endswith(k)), "gemma")
    o = {"model.llm": str(root / family), "model.tokenizer": str(root / family), "model.vae": None,
         "model.vae_subfolder": None, "model.vae_scale": 1, "model.resolution": 8, "model.in_channels": 3,
         "model.pos_embed_max_size": 8, "model.max_prompt_length": 24}
    if ref.dit_hidden_size:
        o["model.dit_hidden_size"] = ref.dit_hidden_size // 32  # 1280 -> 40 against the tiny width 64
    if ref.initial_layers:  # tiny LLMs have 4 layers: keep some text-only layers first and drop some last
        o["model.initial_layers"] = ref.initial_layers // 2
        o["model.dit_num_layers"] = 3 - ref.initial_layers // 2
    if ref.text_modulation:
        o["model.text_modulation"] = {"encoder": str(root / "clip"), "subfolder": "text_encoder",
                                      "tokenizer_subfolder": "tokenizer", "dim": 32}
    return o


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give zero-initialised parts (adaLN, proj_out) random values so comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))
    return module


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 API server on 127.0.0.1 (a real HTTP server, not in-process patching)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FUSEDIT_S3_ENDPOINT": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["FUSEDIT_S3_ENDPOINT"]
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _is_worker(config) -> bool:
    """True inside a pytest-xdist worker (`make test` runs two); the controller reports for all of them."""
    return hasattr(config, "workerinput")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: add a finished worker's fuzz-case counts to this process's."""
    from tests.fuzzing import FUZZ_CASES

    for name, n in getattr(node, "workeroutput", {}).get("fuzz_cases", {}).items():
        FUZZ_CASES[name] = FUZZ_CASES.get(name, 0) + n


def pytest_terminal_summary(terminalreporter):
    """Print how many cases each fuzz property ran; also as JSON to $FUSEDIT_FUZZ_REPORT when set."""
    from tests.fuzzing import FUZZ_CASES, PROFILE

    if not FUZZ_CASES or _is_worker(terminalreporter.config):
        return
    terminalreporter.section(f"fuzz cases per property (profile {PROFILE})")
    for node, n in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"{n:6d}  {node}")
    if path := os.environ.get("FUSEDIT_FUZZ_REPORT"):
        with open(path, "w") as f:
            json.dump({"profile": PROFILE, "cases": dict(sorted(FUZZ_CASES.items()))}, f, indent=2)


# The only skips a CI run (CI=true) accepts, by a fragment of their reason, with why each is acceptable.
# Any other skip (a tool the set-up should have installed: kubectl, Chromium, hadolint...) fails the run.
ALLOWED_SKIPS = {
    "mounting a tmpfs is not allowed here": "needs CAP_SYS_ADMIN, which CI containers lack; the file-size-limit "
                                            "case of the same test covers a full disk",
}


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2].removeprefix("Skipped: ") if isinstance(longrepr, tuple) else str(longrepr)


def unlisted_skips(reports) -> list[str]:
    """`nodeid: reason` of every skip whose reason matches no ALLOWED_SKIPS entry."""
    return [f"{r.nodeid}: {_skip_reason(r)}" for r in reports
            if not any(allowed in _skip_reason(r) for allowed in ALLOWED_SKIPS)]


def pytest_sessionfinish(session, exitstatus):
    """Print the skip count; under CI=true fail the run on any skip not in ALLOWED_SKIPS. Under xdist the
    controller sees every worker's reports and decides; a worker only hands its fuzz-case counts over."""
    if _is_worker(session.config):
        from tests.fuzzing import FUZZ_CASES

        session.config.workeroutput["fuzz_cases"] = dict(FUZZ_CASES)
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = [r for r in reporter.stats.get("skipped", []) if getattr(r, "nodeid", None)]
    bad = unlisted_skips(skipped)
    reporter.ensure_newline()
    reporter.write_line(f"skipped: {len(skipped)} ({len(skipped) - len(bad)} allowed in tests/conftest.py)")
    if bad and os.environ.get("CI") == "true":
        for line in bad:
            reporter.write_line(f"CI=true: skip not allowed: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
