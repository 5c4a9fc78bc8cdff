"""A training loss from the cache equals the online loss (same noise, timesteps, samples)."""
from __future__ import annotations

import pytest
import torch

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.frozen import load_text_encoder
from fusedit.components.cache.reader import CachedFeatures, OnlineFeatures, open_features, sample_x0
from fusedit.model.config import resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import llm_config_for
from fusedit.model.transformer import FuseDiTTransformer
from tests.cache_helpers import DEEP, SHALLOW, make_shards, tiny_recipe
from tests.conftest import randomize


def _loss(recipe, feats, batch, text, seed: int = 0) -> torch.Tensor:
    arch, spec = resolve(recipe.model, llm_config_for(recipe.model.llm))
    torch.manual_seed(0)
    model = randomize(FuseDiTTransformer(arch.model_dump(), spec.model_dump(),
                                         sample_size=recipe.model.latent_size), std=0.05)
    flow = RectifiedFlow(recipe.flow)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(batch.mean.shape, generator=g)
    x0 = sample_x0(batch.mean, batch.logvar, feats.latent_shift, feats.latent_scale, noise=eps)
    sigmas = flow.sample_sigmas(x0.shape[0], g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return flow.loss(model, x0, text, sigmas, noise)


@pytest.mark.parametrize("name, vae", [(DEEP, True), (SHALLOW, False)])
def test_cached_loss_equals_online_loss(tmp_path, tiny_dir, name, vae):
    shards = make_shards(tmp_path / "in", samples=10, shard_size=4)
    recipe = tiny_recipe(name, tiny_dir, vae)
    build_cache(str(shards), str(tmp_path / "fp32"), recipe, dtype="fp32", progress=False)
    build_cache(str(shards), str(tmp_path / "bf16"), recipe, dtype="bf16", progress=False)

    online = open_features(recipe, str(shards), batch_size=4, seed=5)
    cached = open_features(recipe, str(tmp_path / "fp32"), batch_size=4, seed=5)
    cached16 = open_features(recipe, str(tmp_path / "bf16"), batch_size=4, seed=5)
    assert isinstance(online, OnlineFeatures) and isinstance(cached, CachedFeatures)
    assert online.uncond is None and (online.latent_shift, online.latent_scale) == (
        cached.latent_shift, cached.latent_scale)
    assert (cached.latent_scale != 1.0) == vae

    encoder = load_text_encoder(recipe, torch.device("cpu"))
    for step in (0, 2):  # step 2 straddles the epoch boundary (10 samples, batch 4)
        ob, cb, cb16 = (next(f.batches(step)) for f in (online, cached, cached16))
        assert ob.keys == cb.keys == cb16.keys and ob.captions == cb.captions and ob.text is None
        assert (cb.logvar is None) == (not vae)
        with torch.no_grad():
            text = encoder.encode(ob.captions)
        assert torch.equal(cb.text.mask, text.mask)
        exact = _loss(recipe, online, ob, text)
        from_cache = _loss(recipe, cached, cb, cb.text)
        from_bf16 = _loss(recipe, cached16, cb16, cb16.text)
        assert abs(float(exact - from_cache)) <= 1e-5, (float(exact), float(from_cache))
        rel = abs(float(exact - from_bf16)) / float(exact)
        print(f"{name} step {step}: online {float(exact):.6f} fp32 cache {float(from_cache):.6f} "
              f"bf16 cache {float(from_bf16):.6f} (relative difference {rel:.2e})")
        assert rel < 1e-3

    with torch.no_grad():
        empty = encoder.encode([""])
    for a, b in zip(cached.uncond.tensors().values(), empty.tensors().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-5)
