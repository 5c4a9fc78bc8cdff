"""Training-step throughput of the DiT at a recipe's real shapes: random weights, cached text K/V.

One step is what the trainer does with a cached text stream: rectified-flow loss under bf16 autocast
(fp32 parameters), backward, gradient clipping at 1.0, fused AdamW; no LLM and no VAE run. MFU is the
facts file's analytic FLOP count (section 7) over a bf16 matmul rate measured in the same run, so the
ratio does not depend on a datasheet. Without a GPU it runs the tiny recipe at tiny shapes (fp32),
so `make bench` always exercises it; the printed fields are the same.
Usage: python bench/train_step.py [--recipe fusedit/baseline fusedit/large-scale] [--batch 16]
       [--resolution 512] [--steps 8] [--warmup 3] [--compile] [--device cuda]
Output: one `key=value` line per measurement (`matmul ...`, `train ...`).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from functools import partial

import torch

from fusedit.errors import UserError
from fusedit.model.config import load_recipe, resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import TextContext, llm_config_for
from fusedit.model.transformer import FuseDiTTransformer

GPU_RECIPES = ["fusedit/baseline", "fusedit/large-scale"]
_TMP: list[tempfile.TemporaryDirectory] = []  # a fallback tiny LLM lives as long as the process


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def compute_dtype(dev: torch.device) -> torch.dtype:
    """What the trainer's precision 'auto' computes in: bf16 autocast on GPU, fp32 on CPU."""
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def autocast(dev: torch.device):
    dt = compute_dtype(dev)
    return torch.autocast(dev.type, dtype=dt) if dt != torch.float32 else contextlib.nullcontext()


def load(name: str, resolution: int | None = None, sets: list[str] = ()):
    """Recipe, DiT shapes and text spec; a local LLM path that is missing (tiny) becomes the tiny preset."""
    over = ([f"model.resolution={resolution}"] if resolution else []) + list(sets)
    rec = load_recipe(name, over)
    try:
        llm = llm_config_for(rec.model.llm)
    except UserError:
        rec = load_recipe(name, over + ["model.llm=tiny-gemma", "model.tokenizer=tiny-gemma"])
        try:
            llm = llm_config_for(rec.model.llm)
        except UserError:  # no such preset: make the tiny LLM's files
            from fusedit.model import tiny

            _TMP.append(tempfile.TemporaryDirectory())
            tiny.build_llm(_TMP[-1].name, "tiny-gemma")
            rec = load_recipe(name, over + [f"model.llm={_TMP[-1].name}"])
            llm = llm_config_for(rec.model.llm)
    arch, spec = resolve(rec.model, llm)
    return rec, arch, spec


def build_model(rec, arch, spec, dev: torch.device, compile_blocks: bool) -> FuseDiTTransformer:
    """Random weights, initialised on the device (fast at 2B parameters); optionally each block compiled."""
    with torch.device(dev):
        model = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=rec.model.latent_size)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    return model


def text_context(arch, spec, batch: int, length: int, dev: torch.device, dtype: torch.dtype, seed: int = 0,
                 lengths: torch.Tensor | None = None) -> TextContext:
    """Random right-padded text features as the cache gives them: per shared layer (B, kv_heads, T, head_dim).

    The first sample fills the row (padding='longest'); the others are shorter, so the key mask is real.
    """
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=g)
        lengths[0] = length
    mask = torch.arange(length)[None] < lengths[:, None]

    def rand(*shape):
        x = torch.randn(*shape, generator=g) * mask.view(batch, *([1] * (len(shape) - 3)), length, 1)
        return x.to(dev, dtype)

    if spec.kind == "kv":
        kv = tuple((rand(batch, arch.num_kv_heads, length, arch.head_dim),
                    rand(batch, arch.num_kv_heads, length, arch.head_dim)) for _ in spec.layers)
        ctx = TextContext(mask=mask.to(dev), kv=kv)
    else:
        ctx = TextContext(mask=mask.to(dev), states=rand(batch, length, arch.text_dim))
    if arch.pooled_dim:
        ctx = replace(ctx, pooled=torch.randn(batch, arch.pooled_dim, generator=g).to(dev, dtype))
    return ctx


def image_tokens(rec, arch) -> int:
    return (rec.model.latent_size // arch.patch_size) ** 2


def forward_flops(arch, n_image: int, n_text: int) -> float:
    """DiT forward FLOPs per image (facts file, section 7): matmuls of every image token + its attention."""
    d, h, kv, hd, i = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.mlp_dim
    linear = 2 * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * i)
    attention = 4 * n_image * (n_text + n_image) * h * hd
    return arch.num_layers * (n_image * linear + attention)


def matmul_rate(dev: torch.device, n: int | None = None, reps: int = 10) -> tuple[float, int]:
    """Measured FLOP/s of an n^3 matmul in the compute dtype (the MFU denominator), and n."""
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=compute_dtype(dev))
    b = torch.randn(n, n, device=dev, dtype=compute_dtype(dev))
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0), n


def reset_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_gib(dev: torch.device) -> float:
    """GPU: peak allocated by torch. CPU: the process's peak resident set (includes Python and libraries)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_name(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{torch.get_num_threads()}-threads"
    return name.replace(" ", "_")


def report(kind: str, **fields) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace(" ", "_")

    print(kind, " ".join(f"{k}={fmt(v)}" for k, v in fields.items()), flush=True)


def timed(fn, dev: torch.device, warmup: int, repeats: int):
    """Mean seconds per call of fn after warm-up calls (device synced around the timed ones), and its last result."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(dev)
    return (time.perf_counter() - t0) / repeats, out


def time_train(rec, arch, spec, dev, batch: int, text_len: int, steps: int, warmup: int, compile_: bool) -> dict:
    """Mean seconds per optimizer step after warm-up, and the peak memory of the whole run."""
    reset_memory(dev)
    torch.manual_seed(0)
    model = build_model(rec, arch, spec, dev, compile_).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=dev.type == "cuda")
    flow = RectifiedFlow(rec.flow)
    size = rec.model.latent_size
    x0 = torch.randn(batch, arch.in_channels, size, size, device=dev)
    noise = torch.randn_like(x0)
    sigmas = flow.sample_sigmas(batch, torch.Generator().manual_seed(0), device=dev)
    text = text_context(arch, spec, batch, text_len, dev, compute_dtype(dev))

    def step() -> torch.Tensor:
        with autocast(dev):
            loss = flow.loss(model, x0, text, sigmas, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    dt, loss = timed(step, dev, warmup, steps)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {float(loss)}")
    return {"s_per_step": dt, "params_b": sum(p.numel() for p in params) / 1e9}


def fit_batch(fn, dev: torch.device, batch: int, kind: str, label: dict):
    """Run fn(batch); on out-of-memory say so and halve the batch (an H100 has less memory than an H200)."""
    while batch >= 1:
        try:
            return batch, fn(batch)
        except torch.OutOfMemoryError:
            pass
        except Exception as e:  # one broken configuration should not hide the others' figures
            traceback.print_exc()
            report(kind, **label, batch=batch, status="error", error=type(e).__name__)
            return 0, None
        report(kind, **label, batch=batch, status="out_of_memory")
        reset_memory(dev)
        batch //= 2
    return 0, None


def shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The options both benches share: which recipes, at which shapes, on which device."""
    ap.add_argument("--recipe", nargs="+", help="default: baseline and large-scale on GPU, tiny on CPU")
    ap.add_argument("--resolution", type=int, help="pixels (default: the recipe's, 512 for the real ones)")
    ap.add_argument("--text-len", type=int, help="text tokens (default: the recipe's max_prompt_length)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--set", action="append", default=[], help="recipe override, e.g. model.dit_num_layers=2")


def configurations(args):
    """Report the measured matmul rate, then yield (dev, rate, name, rec, arch, spec, text_len, n_img) per recipe."""
    dev = pick_device(args.device)
    rate, n = matmul_rate(dev)
    report("matmul", device=device_name(dev), dtype=str(compute_dtype(dev)).split(".")[-1], n=n, tflops=rate / 1e12)
    for name in args.recipe or (GPU_RECIPES if dev.type == "cuda" else ["tiny"]):
        rec, arch, spec = load(name, args.resolution, args.set)
        yield dev, rate, name, rec, arch, spec, args.text_len or rec.model.max_prompt_length, image_tokens(rec, arch)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(ap)
    ap.add_argument("--batch", type=int, help="default 16 on GPU, 4 on CPU")
    ap.add_argument("--steps", type=int, help="timed steps (default 8 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    args = ap.parse_args(argv)
    for dev, rate, name, rec, arch, spec, text_len, n_img in configurations(args):
        gpu = dev.type == "cuda"
        flops = 3 * forward_flops(arch, n_img, text_len)
        label = {"recipe": name, "res": rec.model.resolution, "compile": args.compile}
        run = partial(time_train, rec, arch, spec, dev, text_len=text_len, steps=args.steps or (8 if gpu else 3),
                      warmup=args.warmup if args.warmup is not None else (3 if gpu else 1), compile_=args.compile)
        batch, r = fit_batch(run, dev, args.batch or (16 if gpu else 4), "train", label)
        if r is None:
            continue
        ips = batch / r["s_per_step"]
        report("train", **label, batch=batch, image_tokens=n_img, text_tokens=text_len, params_b=r["params_b"],
               s_per_step=r["s_per_step"], images_per_s=ips, tflop_per_image=flops / 1e12,
               mfu=ips * flops / rate, peak_mem_gib=peak_memory_gib(dev))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
