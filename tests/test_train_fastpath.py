"""The trainer's fast path: inputs made ahead on a thread, losses read back in batches, compiled blocks.

None of it may change a number: the loss curve of a compiled stage equals the eager one, the inputs of
a step do not depend on when or where they were made, and a device run keeps nothing on the host.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.reader import open_features
from fusedit.components.train import distributed
from fusedit.components.train.logs import TrainLogs
from fusedit.components.train.loop import train
from fusedit.components.train.step_inputs import Prefetch, make_inputs
from fusedit.model.config import resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import llm_config_for
from fusedit.model.transformer import FuseDiTTransformer
from tests.cache_helpers import DEEP, make_shards, tiny_recipe


def _params(tmp_path, **stage) -> str:
    p = tmp_path / "params.yaml"
    base = {"name": "base", "steps": 4, "batch_size": 4, "save_every": 2, "ema_every": 1, "log_every": 3,
            "sample_prompts": ["a red square"], **stage}
    p.write_text(yaml.safe_dump({"train": {"seed": 3, "stages": [base]}}))
    return str(p)


def _losses(out) -> list[float]:
    return [float(ln.split("\t")[1]) for ln in (out / "loss.tsv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("fastpath")
    recipe = tiny_recipe(DEEP, tiny_dir, True)
    build_cache(str(make_shards(root / "in", samples=12, shard_size=6)), str(root / "cache"), recipe,
                dtype="fp32", progress=False)
    return recipe, root / "cache"


def test_compiled_blocks_train_the_same_curve(tmp_path, cache):
    """`compile: blocks` (inductor, text padded to the recipe's fixed length) against eager, per step."""
    recipe, data = cache
    eager = train(recipe, "base", str(data), str(tmp_path / "eager"), _params(tmp_path, compile="none"))
    torch._dynamo.reset()
    counters.clear()
    compiled = train(recipe, "base", str(data), str(tmp_path / "compiled"), _params(tmp_path, compile="blocks"))
    # one graph serves every block and every step: captions of any length are padded to one length
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 4 and a[0] > 0
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-4)
    # in-place compile keeps parameter names: a compiled run resumes the eager run's checkpoint
    again = train(recipe, "base", str(data), str(tmp_path / "eager"), _params(tmp_path, compile="blocks",
                                                                                   steps=6))
    assert again.start_step == 4 and len(_losses(tmp_path / "eager")) == 6


def test_step_inputs_move_to_the_device_whole(cache):
    """Every tensor a step uses, the text mask included, follows the batch to the device: on the meta
    device a host tensor left behind fails the forward, as it would on a GPU."""
    recipe, data = cache
    feats = open_features(recipe, str(data), batch_size=4, seed=1)
    flow = RectifiedFlow(recipe.flow)
    inputs = next(make_inputs(feats.batches(0), 0, 4, 0, 1, flow, 0.5, feats.latent_shift, feats.latent_scale))
    on_meta = inputs.to(torch.device("meta"))
    text = on_meta.text_or_captions(feats.uncond.to("meta"))
    assert {t.device.type for t in text.tensors().values()} == {"meta"}
    arch, spec = resolve(recipe.model, llm_config_for(recipe.model.llm))
    dit = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=recipe.model.latent_size).to("meta")
    loss = flow.loss(dit, on_meta.x0, text, on_meta.sigmas, on_meta.noise)
    loss.backward()
    assert loss.device.type == "meta" and all(p.grad is not None for p in dit.blocks.parameters())
    with pytest.raises(RuntimeError):  # the check has teeth: a mask left on the host fails there
        flow.loss(dit, on_meta.x0, type(text)(mask=inputs.text.where(inputs.drop, feats.uncond).mask,
                                              kv=text.kv), on_meta.sigmas, on_meta.noise)


def test_inputs_made_ahead_equal_inputs_made_in_step(cache):
    recipe, data = cache
    feats = open_features(recipe, str(data), batch_size=2, seed=4, rank=1, world=2)
    flow = RectifiedFlow(recipe.flow)

    def inputs():
        return make_inputs(feats.batches(3), 3, 4, 2, 9, flow, 0.3, feats.latent_shift, feats.latent_scale)

    with Prefetch(inputs(), depth=0) as in_step:  # made when asked for, on this thread
        direct = [next(in_step) for _ in range(5)]
    with Prefetch(inputs(), depth=2) as ahead:
        made = [next(ahead) for _ in range(5)]
    for a, b in zip(direct, made, strict=True):
        assert a.step == b.step and a.captions == b.captions
        for x, y in [(a.x0, b.x0), (a.sigmas, b.sigmas), (a.noise, b.noise), (a.drop, b.drop)]:
            assert torch.equal(x, y)
        assert all(torch.equal(a.text.tensors()[k], v) for k, v in b.text.tensors().items())
    assert [i.step for i in direct] == [3, 4, 5, 6, 7]


def test_prefetch_keeps_order_raises_where_the_error_is_and_stops():
    def items():
        yield from range(3)
        raise ValueError("shard 7 is gone")

    got = []
    with Prefetch(items(), depth=1) as p, pytest.raises(ValueError, match="shard 7"):
        for x in p:
            got.append(x)
    assert got == [0, 1, 2]

    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    p = Prefetch(endless(), depth=2)
    assert [next(p) for _ in range(4)] == [0, 1, 2, 3]
    time.sleep(0.2)
    assert len(made) <= 4 + 2 + 1  # bounded: never more than `depth` ahead (plus the one being put)
    p.close()
    assert not any(t.name == "step-inputs" and t.is_alive() for t in threading.enumerate() if t is p._thread)


def test_losses_are_read_back_in_batches_and_a_nan_stops_before_the_save(tmp_path):
    d = distributed.Dist(0, 1, torch.device("cpu"), "single")
    logs = TrainLogs(str(tmp_path), "base", 0, d)
    for step, value in enumerate([0.5, 0.25, float("nan"), 0.1], start=1):
        logs.step(step, torch.tensor(value), 1e-3, 4)
    assert logs.rows == [] and len(logs.pending) == 4  # nothing read back yet
    with pytest.raises(RuntimeError, match="loss is nan at step 3"):
        logs.settle()
    assert [r[:2] for r in logs.rows] == [(1, 0.5), (2, 0.25)]
    logs.step(5, torch.tensor(0.125), 1e-3, 4)
    assert logs.settle() == 0.125 and logs.rows[-1][:2] == (5, 0.125)
    logs.close()
    assert (tmp_path / "loss.tsv").read_text().splitlines()[1:] == [
        f"{s}\t{v:.6f}\t0.001" for s, v, _ in logs.rows]  # throughput goes to TensorBoard only


def test_ema_update_is_the_lerp_and_lives_where_memory_allows(monkeypatch):
    from types import SimpleNamespace

    from fusedit.components.train.config import Stage
    from fusedit.components.train.ema import EMA, ema_on_device

    g = torch.Generator().manual_seed(0)
    w0 = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    ema = EMA(w0, decay=0.9)
    steps = [{k: torch.randn(v.shape, generator=g) for k, v in w0.items()} for _ in range(2)]
    for w in steps:
        ema.update(w)
    for k in w0:
        ref = w0[k].clone()
        for w in steps:
            ref = 0.9 * ref + 0.1 * w[k]
        assert torch.allclose(ema.state()[k], ref, atol=1e-6)
    assert ema.nbytes == 17 * 4

    big = EMA({}, 0.99)
    big.shadow = {"w": torch.empty(2 * 2**30 // 4, device="meta")}  # 2 GiB of fp32 weights
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=80 * gib))
    cuda = distributed.Dist(0, 1, torch.device("cuda", 0), "single")

    def where(peak_gib: float, **stage) -> bool:
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda _d: int(peak_gib * gib))
        return ema_on_device(Stage(name="s", steps=1, **stage), cuda, big)

    assert where(70) and not where(77)  # 10 GiB left holds 2 GiB + 2 spare; 3 GiB does not
    assert not where(10, ema_device="host") and where(79, ema_device="device")
    assert not ema_on_device(Stage(name="s", steps=1), distributed.Dist(0, 2, torch.device("cuda", 0), "fsdp"), big)
    assert not ema_on_device(Stage(name="s", steps=1, ema_device="device"),
                              distributed.Dist(0, 1, torch.device("cpu"), "single"), big)


def test_compile_auto_falls_back_to_eager_when_compilation_fails(tmp_path, cache, monkeypatch, caplog):
    """`compile: auto` (a GPU default) must not stop a stage where the compiler cannot run; `blocks` does."""
    from fusedit.components.train import loop as train_module

    def broken(_gm, _inputs):
        raise RuntimeError("no working compiler here")

    recipe, data = cache
    eager = train(recipe, "base", str(data), str(tmp_path / "eager"), _params(tmp_path, compile="none"))
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", broken)
    monkeypatch.setattr(train_module, "_compiles", lambda _st, _dev: True)  # as on CUDA
    torch._dynamo.reset()
    fallback = train(recipe, "base", str(data), str(tmp_path / "auto"), _params(tmp_path, compile="auto"))
    assert "compiling the DiT blocks failed" in caplog.text and "no working compiler here" in caplog.text
    assert _losses(tmp_path / "auto") == _losses(tmp_path / "eager")
    assert fallback.final_loss == eager.final_loss
    torch._dynamo.reset()
    with pytest.raises(Exception, match="no working compiler here"):
        train(recipe, "base", str(data), str(tmp_path / "blocks"), _params(tmp_path, compile="blocks"))


def test_a_stage_that_trains_the_llm_reads_captions_from_a_cache(tmp_path, cache):
    """trains: dit+llm on a feature cache computes the text online from the cached captions: the same
    curve as the same stage on the shards the cache was built from."""
    recipe, data = cache
    params = _params(tmp_path, trains="dit+llm", llm_lr=1e-3, compile="none")
    from_cache = train(recipe, "base", str(data), str(tmp_path / "cache"), params)
    from_shards = train(recipe, "base", str(data.parent / "in"), str(tmp_path / "shards"), params)
    assert from_cache.llm_trainable_params == from_shards.llm_trainable_params > 0
    assert _losses(tmp_path / "cache") == pytest.approx(_losses(tmp_path / "shards"), rel=1e-5)


def test_a_stage_that_trains_the_llm_never_decodes_the_cached_text(tmp_path, cache, monkeypatch):
    """trains: dit+llm on a feature cache neither decodes nor pads the cached text K/V (the LLM computes the text
    each step); the dit-only stage on the same cache reads and pads them every step. Both get the same images."""
    import safetensors.torch

    from fusedit.components.cache import reader
    from fusedit.components.cache.reader import open_features

    recipe, data = cache
    decoded: list[set[str]] = []
    padded: list[int] = []
    load, pad = safetensors.torch.load, reader.text_from_tensors
    monkeypatch.setattr(safetensors.torch, "load", lambda b: decoded.append(set(t := load(b))) or t)
    monkeypatch.setattr(reader, "text_from_tensors", lambda items, *a, **k: padded.append(len(items)) or
                        pad(items, *a, **k))
    text_keys = {"states", "pooled", "k0", "v0"}

    train(recipe, "base", str(data), str(tmp_path / "joint"),
          _params(tmp_path, steps=2, trains="dit+llm", llm_lr=1e-3, compile="none"))
    samples = [k for k in decoded if k & {"mean", "logvar", "pixels"}]
    assert len(samples) >= 8 and not any(k & text_keys for k in samples), decoded
    assert padded == [1]  # the empty caption's features (uncond), once when the cache is opened; no batch

    decoded.clear(), padded.clear()
    train(recipe, "base", str(data), str(tmp_path / "dit"), _params(tmp_path, steps=2, compile="none"))
    samples = [k for k in decoded if k & {"mean", "logvar", "pixels"}]
    assert len(samples) >= 8 and all(k & text_keys for k in samples)
    assert padded.count(4) >= 2  # every step's batch

    def first(text):
        return next(open_features(recipe, str(data), text=text, batch_size=4, seed=1).batches())

    with_text, without = first(True), first(False)
    assert without.text is None and with_text.text is not None and without.keys == with_text.keys
    assert torch.equal(without.mean, with_text.mean) and torch.equal(without.logvar, with_text.logvar)


def test_fp8_stage_option_keeps_parameter_names_and_without_fp8_hardware_the_numbers(tmp_path, cache, caplog):
    from safetensors.torch import load_file

    recipe, data = cache
    caplog.set_level("INFO")
    plain = train(recipe, "base", str(data), str(tmp_path / "plain"), _params(tmp_path, compile="none"))
    fp8 = train(recipe, "base", str(data), str(tmp_path / "fp8"), _params(tmp_path, compile="none", fp8_matmuls=True))
    assert "projections left in full precision (this device has no FP8 matmul)" in caplog.text
    assert _losses(tmp_path / "fp8") == _losses(tmp_path / "plain") and fp8.final_loss == plain.final_loss
    a, b = (load_file(str(tmp_path / o / "checkpoints" / "step-00000004" / "model.safetensors"))
            for o in ("plain", "fp8"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
