"""Cache build samples/s, and one training step from the cache vs online (same tiny recipe, one run).

"Online" is what the reference does every step: decode + resize the JPEGs, run the frozen VAE (if
any) and the frozen LLM, then the DiT step; "cached" reads the stored features and runs the DiT step.
Usage: python bench/cache_throughput.py [--samples 256] [--batch-size 16] [--steps 10] [--vae]
       [--llm tiny-gemma|tiny-gemma-2|google/gemma-2b (random weights at real shapes; use a GPU)]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from fusedit.components.cache.build import build_cache
from fusedit.components.cache.frozen import load_text_encoder
from fusedit.components.cache.reader import open_features, sample_x0
from fusedit.components.data.synth import synth
from fusedit.components.shared.device import pick_device
from fusedit.model import tiny
from fusedit.model.config import load_recipe, resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import llm_config_for
from fusedit.model.transformer import FuseDiTTransformer


def make_llm(root: str, preset: str) -> str:
    out = os.path.join(root, "llm")
    tok = tiny.build_tokenizer(out)
    if preset.startswith("tiny-"):
        tiny.build_llm(out, preset, vocab_size=len(tok))
    else:  # real shapes, random weights (bf16 on disk to halve the write), no download
        from transformers import AutoModel

        from fusedit.model.presets import llm_config

        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is slow on CPU
            model = AutoModel.from_config(llm_config(preset, vocab_size=len(tok)), dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
    return out


def time_steps(recipe, feats, encoder, steps: int, device) -> float:
    """Mean seconds per training step (batch fetch + features + DiT forward/backward/update)."""
    arch, spec = resolve(recipe.model, llm_config_for(recipe.model.llm))
    model = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=recipe.model.latent_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flow = RectifiedFlow(recipe.flow)
    it = feats.batches(0)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        b = next(it)
        if b.text is None:
            with torch.no_grad():
                text = encoder.encode(b.captions)
        else:
            text = b.text.to(device)  # cached batches are in host memory
        x0 = sample_x0(b.mean.to(device), None if b.logvar is None else b.logvar.to(device),
                       feats.latent_shift, feats.latent_scale)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):  # as the reference
            loss = flow.loss(model, x0, text, flow.sample_sigmas(x0.shape[0], device=device),
                             torch.randn_like(x0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--vae", action="store_true", help="latent space through the tiny SD3-style VAE")
    ap.add_argument("--llm", default="tiny-gemma")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = pick_device(None)
    with tempfile.TemporaryDirectory() as root:
        llm = make_llm(root, args.llm)
        overrides = {"model.llm": llm, "model.resolution": args.resolution}
        if args.vae:
            tiny.build_vae(os.path.join(root, "vae"))
            overrides.update({"model.vae": os.path.join(root, "vae"), "model.vae_subfolder": None,
                              "model.vae_scale": 8, "model.in_channels": 16})
        recipe = load_recipe("tiny", overrides)
        shards = os.path.join(root, "shards")
        synth(shards, samples=args.samples, seed=0, shard_size=max(1, args.samples // 4), bad_fraction=0.0)
        r = build_cache(shards, os.path.join(root, "cache"), recipe, dtype=args.dtype,
                        batch_size=max(32, args.batch_size), progress=False, echo=lambda s: None)
        cached = open_features(recipe, os.path.join(root, "cache"), batch_size=args.batch_size, seed=0)
        online = open_features(recipe, shards, batch_size=args.batch_size, seed=0, device=device)
        encoder = load_text_encoder(recipe, device)
        t_cached = time_steps(recipe, cached, None, args.steps, device)
        t_online = time_steps(recipe, online, encoder, args.steps, device)
    space = "latent (tiny VAE)" if args.vae else "pixel"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'cores'}), recipe tiny, LLM {args.llm}, {space} space, "
          f"{args.resolution}px, batch {args.batch_size}, {args.dtype} cache")
    print(f"cache build: {r.n_samples} samples in {r.seconds:.2f}s = {r.samples_per_s:.1f} samples/s, "
          f"{r.bytes_per_sample / 1e3:.1f} KB/sample")
    print(f"train step: cached {t_cached * 1e3:.1f} ms, online {t_online * 1e3:.1f} ms, "
          f"online/cached = {t_online / t_cached:.2f}x")


if __name__ == "__main__":
    main()
