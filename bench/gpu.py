"""One command for the GPU figures: training and sampling at the real shapes, per optimisation setting.

Random weights built directly on the device, the text stream cached (random K/V as the cache gives
them, right-padded), no LLM and no VAE. A training step is the trainer's: rectified-flow loss under
bf16 autocast, backward, clipping at 1.0, fused AdamW. Sampling is 25 Euler steps with guidance 6
through `RectifiedFlow.sample`. FLOPs are the facts file's analytic count (section 7: 3 DiT forwards
per training image, 50 per sampled image) over the bf16 matmul rate measured first on the same card
(also for the FP8 row: its MFU is bf16-equivalent, so above 100% is possible).
Rows run most important first and each is timed after warm-up with the device synchronised; a row
that runs out of memory halves its batch, one that fails says so, and once --budget-s is spent the
rest are listed as skipped, so the table always prints. Without CUDA (or with --tiny) every row runs
on the tiny recipe at tiny shapes, compiled rows with dynamo's eager backend (graph capture, no C++
build; tests/test_model_fastpath.py checks inductor's numbers): that is what CI runs, the figures only
prove the rows work.
Usage: python bench/gpu.py [--tiny] [--only train|sample] [--rows SUBSTRING ...] [--budget-s 480]
       [--json PATH] [--profile] [--steps N] [--device cuda]
Output: `matmul ...` and one `row ...` line per row as it finishes (key=value), then one markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch

from fusedit.errors import UserError
from fusedit.model.config import load_recipe, resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import TextContext, llm_config_for
from fusedit.model.transformer import FuseDiTTransformer

GPU_RECIPES = ["fusedit/baseline", "fusedit/large-scale"]
_TMP: list[tempfile.TemporaryDirectory] = []  # a fallback tiny LLM lives as long as the process


# ---- device, shapes, FLOPs ----------------------------------------------------------------------

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


def report(tag: str, **fields) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace(" ", "_")

    print(tag, " ".join(f"{k}={fmt(v)}" for k, v in fields.items()), flush=True)


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


# ---- the optimisation settings ------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One combination of the speed options; none of them changes what is computed (tests/test_model_fastpath)."""

    compile: str = "none"  # COMPILE key: how each DiT block is compiled
    kernel: str = "sdpa"  # attention kernel for padded text: sdpa (dense key mask) | flex (BlockMask)
    padded: bool = True  # text right-padded to the longest caption; False: every token valid, no mask at all
    checkpointing: bool = False  # recompute each block in the backward
    weights: str = "fp32"  # WEIGHTS key
    guidance: str = "batched"  # sampling: one forward over [uncond ; cond] (batched) or two (separate)
    matmul: str = "bf16"  # fp8: attention/MLP projections through torch._scaled_mm on Hopper (CPU: bf16 path)

    @property
    def label(self) -> str:
        parts = [self.compile if self.compile != "none" else "eager",
                 "no-mask" if not self.padded else self.kernel]
        parts += ["ckpt"] if self.checkpointing else []
        parts += ["bf16-weights"] if self.weights != "fp32" else []
        parts += ["separate-cfg"] if self.guidance != "batched" else []
        parts += ["fp8"] if self.matmul == "fp8" else []
        return "+".join(parts)


class Compile(NamedTuple):
    whole: bool  # the whole denoiser as one graph, else each DiT block
    kwargs: dict  # Module.compile kwargs on GPU; on CPU every compiled row uses the eager backend


# compile key -> what is compiled, how (None: eager)
COMPILE = {"none": None, "blocks": Compile(False, {}), "blocks-cudagraphs": Compile(False, {"mode": "reduce-overhead"}),
           "model": Compile(True, {}), "model-cudagraphs": Compile(True, {"mode": "reduce-overhead"})}


def build_model(rec, arch, spec, dev: torch.device, s: Setting = Setting()) -> FuseDiTTransformer:
    """Random weights, initialised on the device (fast at 2B parameters), with the setting's runtime options."""
    with torch.device(dev):
        model = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=rec.model.latent_size)
    model.use_attention_kernel(s.kernel)
    if s.checkpointing:
        model.enable_gradient_checkpointing()
    if s.weights == "bf16":
        model.to(torch.bfloat16)
    if s.matmul == "fp8":
        model.use_fp8_matmuls()
    how = COMPILE[s.compile]
    if how is not None:
        kwargs = how.kwargs if dev.type == "cuda" else {"backend": "eager"}
        for part in [model] if how.whole else model.blocks:
            part.compile(**kwargs)
    return model


class FusedAdamW:
    """fp32 weights under bf16 autocast: the optimizer updates the weights the model holds."""

    def __init__(self, params: list[torch.nn.Parameter], dev: torch.device):
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=dev.type == "cuda")

    def step(self, clip: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class MasterAdamW(FusedAdamW):
    """bf16 weights (no per-step weight casts, half the weight memory) with an fp32 master copy and fp32
    optimizer state: the gradients are upcast, clipped and applied to the master, which is copied back."""

    def __init__(self, params: list[torch.nn.Parameter], dev: torch.device):
        self.model_params = params
        super().__init__([torch.nn.Parameter(p.detach().float()) for p in params], dev)

    def step(self, clip: float) -> None:
        for m, p in zip(self.params, self.model_params, strict=True):
            m.grad = p.grad.float()
            p.grad = None
        super().step(clip)
        torch._foreach_copy_([p.data for p in self.model_params], [m.data for m in self.params])


WEIGHTS = {"fp32": FusedAdamW, "bf16": MasterAdamW}


def text_context(arch, spec, batch: int, length: int, dev: torch.device, dtype: torch.dtype, seed: int = 0,
                 lengths: torch.Tensor | None = None) -> TextContext:
    """Random right-padded text features as the cache gives them: per shared layer (B, kv_heads, T, head_dim).

    The first sample fills the row (padding='longest'); the others are shorter, so the key mask is real.
    Lengths all equal to `length` make a batch with no padding (`all_valid`: no mask at all).
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
        ctx = TextContext(mask=mask.to(dev), kv=kv, all_valid=bool(mask.all()))
    else:
        ctx = TextContext(mask=mask.to(dev), states=rand(batch, length, arch.text_dim), all_valid=bool(mask.all()))
    if arch.pooled_dim:
        ctx = replace(ctx, pooled=torch.randn(batch, arch.pooled_dim, generator=g).to(dev, dtype))
    return ctx


# ---- one training row, one sampling row ---------------------------------------------------------

def time_train(rec, arch, spec, dev, batch: int, text_len: int, steps: int, warmup: int,
               s: Setting = Setting(), profile: bool = False) -> dict:
    """Mean seconds per optimizer step after warm-up; the peak memory of the whole run."""
    reset_memory(dev)
    torch.manual_seed(0)
    model = build_model(rec, arch, spec, dev, s).train()
    opt = WEIGHTS[s.weights]([p for p in model.parameters() if p.requires_grad], dev)
    flow = RectifiedFlow(rec.flow)
    size = rec.model.latent_size
    x0 = torch.randn(batch, arch.in_channels, size, size, device=dev)
    noise = torch.randn_like(x0)
    sigmas = flow.sample_sigmas(batch, torch.Generator().manual_seed(0), device=dev)
    lengths = None if s.padded else torch.full((batch,), text_len)
    text = text_context(arch, spec, batch, text_len, dev, compute_dtype(dev), lengths=lengths)

    def step() -> torch.Tensor:
        with autocast(dev):
            loss = flow.loss(model, x0, text, sigmas, noise)
        loss.backward()
        opt.step(1.0)
        return loss

    dt, loss = timed(step, dev, warmup, steps)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {float(loss)}")
    if profile:
        print_profile(step, dev)
    return {"s_per_call": dt, "params_b": sum(p.numel() for p in model.parameters()) / 1e9}


def time_sample(rec, arch, spec, dev, prompts: int, text_len: int, steps: int, guidance: float, repeats: int,
                s: Setting = Setting()) -> dict:
    """Mean seconds per sampling call (all steps, both guidance halves) after one untimed call."""
    reset_memory(dev)
    torch.manual_seed(0)
    model = build_model(rec, arch, spec, dev, s).eval().requires_grad_(False)
    flow = RectifiedFlow(rec.flow)
    lengths = torch.randint(1, text_len + 1, (2 * prompts,), generator=torch.Generator().manual_seed(0))
    lengths[:prompts], lengths[prompts] = 1, text_len  # uncond = the empty caption (BOS only)
    text = text_context(arch, spec, 2 * prompts, text_len, dev, compute_dtype(dev), lengths=lengths)
    uncond, cond = text.select(slice(0, prompts)), text.select(slice(prompts, None))
    size = rec.model.latent_size
    noise = torch.randn(prompts, arch.in_channels, size, size, device=dev)

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(dev):
            return flow.sample(model, cond, uncond, noise, steps=steps, guidance=guidance,
                               batched=s.guidance == "batched")

    dt, x = timed(run, dev, 1, repeats)
    if not torch.isfinite(x).all():
        raise RuntimeError("sample is not finite")
    return {"s_per_call": dt}


def print_profile(step, dev: torch.device, rows: int = 25) -> None:
    """The kernels of two steps by device time: where fused norms/modulation would (or would not) pay."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)


def fit_batch(fn, dev: torch.device, batch: int, tag: str, label: dict):
    """Run fn(batch); on out-of-memory say so and halve the batch (an H100 has less memory than an H200)."""
    while batch >= 1:
        try:
            return batch, fn(batch)
        except torch.OutOfMemoryError:
            pass
        except Exception as e:  # one broken configuration should not hide the others' figures
            traceback.print_exc()
            report(tag, **label, batch=batch, status="error", error=type(e).__name__)
            return 0, None
        report(tag, **label, batch=batch, status="out_of_memory")
        reset_memory(dev)
        batch //= 2
    return 0, None


# ---- the plan: rows in priority order -----------------------------------------------------------

@dataclass(frozen=True)
class Row:
    kind: str  # train | sample
    recipe: str  # GPU recipe name (the tiny recipe stands in on CPU)
    setting: Setting
    batch: int = 16  # training images per step; sampling: prompts per batch (the forward batch is twice that)


_EAGER_MASK = Setting()
_COMPILED_FLEX = Setting(compile="blocks", kernel="flex")
BASE, LARGE = GPU_RECIPES
PLAN = [
    # the headline figures first
    Row("train", BASE, _COMPILED_FLEX),
    Row("train", LARGE, _COMPILED_FLEX),
    Row("sample", BASE, _COMPILED_FLEX, 1),
    Row("sample", BASE, replace(_COMPILED_FLEX, compile="model-cudagraphs"), 1),
    Row("sample", LARGE, replace(_COMPILED_FLEX, compile="model-cudagraphs"), 1),
    Row("sample", LARGE, _COMPILED_FLEX, 16),
    # what each option is worth (baseline), then the large-scale memory options
    Row("train", BASE, _EAGER_MASK),
    Row("train", BASE, replace(_COMPILED_FLEX, matmul="fp8")),
    Row("train", BASE, Setting(compile="blocks")),
    Row("train", BASE, Setting(compile="blocks", padded=False)),
    Row("train", BASE, replace(_COMPILED_FLEX, weights="bf16")),
    Row("train", LARGE, replace(_COMPILED_FLEX, checkpointing=True), 32),
    Row("train", LARGE, replace(_COMPILED_FLEX, weights="bf16")),
    Row("sample", LARGE, replace(_COMPILED_FLEX, compile="model-cudagraphs"), 16),
    Row("sample", LARGE, _COMPILED_FLEX, 1),
    Row("sample", BASE, _EAGER_MASK, 1),
    Row("sample", LARGE, _EAGER_MASK, 1),
    Row("sample", BASE, replace(_COMPILED_FLEX, guidance="separate"), 1),
    Row("train", BASE, Setting(kernel="flex")),
    Row("train", BASE, Setting(padded=False)),
    Row("train", BASE, replace(_COMPILED_FLEX, checkpointing=True)),
    Row("train", LARGE, _EAGER_MASK),
    Row("train", LARGE, Setting(compile="blocks")),
    Row("train", BASE, replace(_COMPILED_FLEX, compile="model")),
    Row("sample", BASE, replace(_COMPILED_FLEX, compile="model"), 1),
    Row("sample", BASE, replace(_COMPILED_FLEX, compile="blocks-cudagraphs"), 1),
    Row("sample", LARGE, replace(_COMPILED_FLEX, compile="blocks-cudagraphs"), 16),
]


def run_row(row: Row, shapes: dict, dev: torch.device, rate: float, args) -> dict:
    rec, arch, spec, text_len, n_img = shapes[row.recipe]
    gpu = dev.type == "cuda"
    label = {"kind": row.kind, "recipe": rec.name, "res": rec.model.resolution, "setting": row.setting.label}
    if row.kind == "train":
        flops = 3 * forward_flops(arch, n_img, text_len)

        def fn(batch):
            return time_train(rec, arch, spec, dev, batch, text_len, args.steps or (6 if gpu else 1),
                              3 if gpu else 1, row.setting, profile=args.profile and not args.profiled)

        batch, r = fit_batch(fn, dev, row.batch if gpu else min(row.batch, 4), "row", label)
        if r is None:
            return {**label, "batch": batch, "status": "error" if batch == 0 else "out_of_memory"}
        args.profiled = True
        ips = batch / r["s_per_call"]
        return {**label, "batch": batch, "images_per_s": ips, "s_per_image": 1 / ips, "mfu": ips * flops / rate,
                "peak_mem_gib": peak_memory_gib(dev), "tflop_per_image": flops / 1e12}
    steps = 25 if gpu else 2
    flops = 2 * steps * forward_flops(arch, n_img, text_len)

    def fn(prompts):
        return time_sample(rec, arch, spec, dev, prompts, text_len, steps, 6.0, 2 if gpu else 1, row.setting)

    prompts, r = fit_batch(fn, dev, row.batch if gpu else min(row.batch, 2), "row", label)
    if r is None:
        return {**label, "batch": prompts, "status": "error" if prompts == 0 else "out_of_memory"}
    per_image = r["s_per_call"] / prompts
    return {**label, "batch": prompts, "steps": steps, "images_per_s": 1 / per_image, "s_per_image": per_image,
            "mfu": flops / per_image / rate, "peak_mem_gib": peak_memory_gib(dev), "tflop_per_image": flops / 1e12}


COLUMNS = [("kind", "kind"), ("recipe", "recipe"), ("setting", "setting"), ("batch", "batch"),
           ("images_per_s", "images/s"), ("s_per_image", "s/image"), ("mfu", "MFU"),
           ("peak_mem_gib", "peak GiB"), ("wall_s", "row s"), ("status", "status")]


def table(results: list[dict]) -> str:
    def cell(r, key):
        v = r.get(key, "ok" if key == "status" else "")
        if key == "mfu" and isinstance(v, float):
            return f"{100 * v:.1f}%"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    ordered = sorted(results, key=lambda r: (r["kind"] != "train", r["recipe"], r.get("batch", 0)))
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |" for r in ordered]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny recipe at tiny shapes (automatic without CUDA)")
    ap.add_argument("--only", choices=["train", "sample"], help="only these rows")
    ap.add_argument("--rows", nargs="+", help="only rows whose setting label contains one of these")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no row after this many seconds")
    ap.add_argument("--steps", type=int, help="timed training steps per row (default 6 on GPU, 1 on CPU)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--profile", action="store_true", help="kernel table of the first training row")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    args = ap.parse_args(argv)
    args.profiled = False
    t_start = time.perf_counter()
    dev = pick_device(args.device)
    tiny = args.tiny or dev.type != "cuda"
    rate, n = matmul_rate(dev)
    report("matmul", device=device_name(dev), dtype=str(compute_dtype(dev)).split(".")[-1], n=n, tflops=rate / 1e12)
    shapes = {}
    for name in GPU_RECIPES:
        rec, arch, spec = load("tiny" if tiny else name)
        shapes[name] = (rec, arch, spec, rec.model.max_prompt_length, image_tokens(rec, arch))
    plan = [r for r in PLAN if (args.only in (None, r.kind))
            and (not args.rows or any(s in r.setting.label for s in args.rows))]
    if tiny:  # both recipes are the tiny one: each (kind, setting) once
        seen = set()
        plan = [r for r in plan if (r.kind, r.setting) not in seen and not seen.add((r.kind, r.setting))]
    results = []
    for row in plan:
        if time.perf_counter() - t_start > args.budget_s:
            results.append({"kind": row.kind, "recipe": row.recipe, "setting": row.setting.label,
                            "batch": row.batch, "status": "skipped"})
            continue
        t_row = time.perf_counter()
        # each row compiles as in a fresh process: no earlier row's guards, dynamic shapes or CUDA-graph
        # pools (the on-disk inductor caches still make a repeated graph cheap)
        torch._dynamo.reset()
        try:
            result = run_row(row, shapes, dev, rate, args)
        except Exception as e:  # noqa: BLE001 - a row that breaks outside fit_batch still leaves the table
            traceback.print_exc()
            result = {"kind": row.kind, "recipe": row.recipe, "setting": row.setting.label, "status": "error",
                      "error": type(e).__name__}
        result["wall_s"] = time.perf_counter() - t_row  # compilation and every try included
        results.append(result)
        report("row", **result)
    dtype = str(compute_dtype(dev)).split(".")[-1]
    print(f"\n{device_name(dev)}: {dtype} matmul {rate / 1e12:.3g} TFLOP/s (n={n}); "
          f"{'tiny shapes; ' if tiny else ''}{time.perf_counter() - t_start:.0f} s\n")
    print(table(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(dev), "matmul_tflops": rate / 1e12, "tiny": tiny,
                       "plan": [asdict(r) for r in plan], "rows": results}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
