"""One training stage: rectified flow on the DiT (optionally the LLM too), resumable to the exact loss.

The batch sequence and every random draw of step s are functions of (seed, s, rank), so resuming
needs only the committed checkpoint (model, EMA, optimizer, LR schedule): no loader replay.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fusedit.components import checkpoint, storage
from fusedit.components.train_config import Stage, load_train_params
from fusedit.errors import UserError
from fusedit.model.config import Recipe, load_recipe, resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.text import TextEncoder, llm_config_for, load_llm, load_tokenizer
from fusedit.model.transformer import FuseDiTTransformer

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on SIGTERM, rerun to resume


class Preempted(Exception):
    """SIGTERM arrived: the step finished and a checkpoint was committed."""


@dataclass
class TrainResult:
    output: str
    stage: str
    start_step: int
    steps: int
    final_loss: float
    images_per_s: float
    trainable_params: int
    llm_trainable_params: int


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The RNG of one step on one rank: caption dropout, timesteps, posterior and flow noise."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> 1))


def reachable_llm_params(encoder: TextEncoder) -> list[torch.nn.Parameter]:
    """LLM parameters a gradient can reach through the text features the DiT reads (probed once).

    The last shared layer's query/output projections and MLP, the final norm and anything after it
    never influence those features, so they stay out of the optimizer.
    """
    llm = encoder.llm
    llm.requires_grad_(True)
    for p in llm.parameters():
        p.grad = None
    probe = encoder.encode(["a probe caption"])
    feats = [t for t in probe.tensors().values() if t.dtype.is_floating_point and t.requires_grad]
    sum(f.float().sum() for f in feats).backward()
    reach = [p for p in llm.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    ids = {id(p) for p in reach}
    for p in llm.parameters():
        p.grad = None
        p.requires_grad_(id(p) in ids)
    return reach


class EMA:
    """Exponential moving average of the trainable DiT weights, updated every N steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - self.decay)


def _stage_output(output: str, init_from: str) -> str:
    """init_from is a sibling stage's name (beside our output) or a URI of its own."""
    if "/" in init_from:
        return init_from
    return storage.join(output.rstrip("/").rsplit("/", 1)[0], init_from)


class _SigtermFlag:
    def __init__(self):
        self.set = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.set = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


def _precision(stage: Stage, device: torch.device):
    bf16 = stage.precision == "bf16" or (stage.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train(recipe: str | Recipe, stage: str, data: str, output: str, params: str = "params.yaml",
          overrides: list[str] | None = None, device: str | None = None) -> TrainResult:
    """Run (or resume) one stage; write checkpoints, logs, metrics and the EMA pipeline under output."""
    tp = load_train_params(params)
    st = tp.stage(stage)
    ov = list(overrides or []) + ([f"model.resolution={st.resolution}"] if st.resolution else [])
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, ov)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if st.batch_size % world:
        raise UserError(f"stage '{st.name}': batch_size {st.batch_size} is not divisible by {world} ranks")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    m = rec.model
    arch, spec = resolve(m, llm_config_for(m.llm))
    torch.manual_seed(tp.seed)
    model = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=m.latent_size).to(dev)
    train_llm = st.trains == "dit+llm"
    encoder = TextEncoder(load_llm(m.llm, spec.llm_num_layers).to(dev), load_tokenizer(m.tokenizer or m.llm), spec)

    from fusedit.components.features import check_fingerprint, open_features  # noqa: F401 - the cache step

    features = open_features(rec, data, batch_size=st.batch_size // world, seed=tp.seed, rank=rank, world=world,
                             device=str(dev))
    if train_llm and features.uncond is not None:
        log.warning("stage '%s' trains the LLM: cached text features cannot be used, computing them online",
                    st.name)
    llm_params = reachable_llm_params(encoder) if train_llm else []
    ema = EMA(model, st.ema_decay)
    if st.init_from:
        prev = checkpoint.load_latest(storage.join(_stage_output(output, st.init_from), "checkpoints"))
        if prev is None:
            raise UserError(f"stage '{st.name}': init_from '{st.init_from}' has no committed checkpoint")
        model.load_state_dict(prev.tensors["model"])
        ema.shadow = {k: v.clone().float() for k, v in prev.tensors["ema"].items()}
        if "llm" in prev.tensors:
            encoder.llm.load_state_dict(prev.tensors["llm"], strict=False)

    groups = [{"params": list(model.parameters()), "lr": st.lr}]
    if llm_params:
        groups.append({"params": llm_params, "lr": st.llm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=st.weight_decay, fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / st.warmup_steps) if st.warmup_steps else 1.0)
    flow = RectifiedFlow(rec.flow)

    ckpt_root = storage.join(output, "checkpoints")
    start = 0
    if (ck := checkpoint.load_latest(ckpt_root)) is not None:
        model.load_state_dict(ck.tensors["model"])
        ema.shadow = {k: v.clone().float() for k, v in ck.tensors["ema"].items()}
        if "llm" in ck.tensors:
            encoder.llm.load_state_dict(ck.tensors["llm"], strict=False)
        opt.load_state_dict(ck.objects["optimizer"])
        sched.load_state_dict(ck.objects["scheduler"])
        start = ck.step
        log.info("resuming stage '%s' from step %d", st.name, start)

    logs = Path(output) if not storage.is_s3(output) else Path(".fusedit-logs") / st.name
    logs.mkdir(parents=True, exist_ok=True)
    loss_rows = _resume_rows(logs / "loss.tsv", start)

    def save(step: int) -> None:
        tensors = {"model": model.state_dict(), "ema": ema.shadow}
        if llm_params:
            tensors["llm"] = {k: v for k, v in encoder.llm.state_dict().items()}
        checkpoint.save(ckpt_root, step, tensors, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                        {"stage": st.name, "recipe": rec.name, "seed": tp.seed, "world": world}, st.keep_last)
        _write_rows(logs / "loss.tsv", loss_rows)

    from tqdm import tqdm

    uncond = features.uncond.to(dev) if features.uncond is not None and not train_llm else None
    empty = None if uncond is not None else ""
    t0, seen, loss_val = time.perf_counter(), 0, float("nan")
    model.train()
    it = features.batches(start)
    bar = tqdm(range(start, st.steps), initial=start, total=st.steps, desc=st.name, disable=rank != 0)
    with _SigtermFlag() as sigterm:
        for step in bar:
            batch = next(it)
            g = step_generator(tp.seed, step, rank)
            n = batch.mean.shape[0]
            drop = torch.rand(n, generator=g) < rec.flow.caption_dropout
            sigmas = flow.sample_sigmas(n, g)
            post = torch.randn(batch.mean.shape, generator=g)
            noise = torch.randn(batch.mean.shape, generator=g)
            sample = batch.mean if batch.logvar is None else batch.mean + (0.5 * batch.logvar).exp() * post
            x0 = ((sample - features.latent_shift) * features.latent_scale).to(dev)
            if batch.text is not None and empty is None:
                text = batch.text.to(dev).where(drop.to(dev), uncond)
            else:
                captions = ["" if d else c for d, c in zip(drop.tolist(), batch.captions, strict=True)]
                with torch.set_grad_enabled(train_llm):
                    text = encoder.encode(captions)
            with _precision(st, dev):
                loss = flow.loss(model, x0, text, sigmas.to(dev), noise.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for gr in groups for p in gr["params"]], st.grad_clip)
            opt.step()
            sched.step()
            if (step + 1) % st.ema_every == 0:
                ema.update(model)
            loss_val, seen = float(loss), seen + n
            ips = seen * world / (time.perf_counter() - t0)
            loss_rows.append((step + 1, loss_val, sched.get_last_lr()[0], ips))
            if rank == 0 and (step + 1) % st.log_every == 0:
                bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{ips:.1f}")
            if not math.isfinite(loss_val):
                raise RuntimeError(f"stage '{st.name}': loss is {loss_val} at step {step + 1}")
            if (step + 1) % st.save_every == 0 or step + 1 == st.steps or sigterm.set:
                save(step + 1)
            if sigterm.set and step + 1 < st.steps:
                raise Preempted(f"stage '{st.name}': SIGTERM, checkpoint committed at step {step + 1}")
    result = TrainResult(output, st.name, start, st.steps, loss_val, seen * world / max(time.perf_counter() - t0, 1e-9),
                         sum(p.numel() for p in model.parameters()), sum(p.numel() for p in llm_params))
    if rank == 0:
        _export(rec, model, ema, encoder if llm_params else None, output, st)
        (logs / "metrics.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _resume_rows(path: Path, start: int) -> list[tuple]:
    """Loss rows up to the resumed step (later ones belonged to the interrupted, unsaved tail)."""
    if not path.is_file():
        return []
    rows = [ln.split("\t") for ln in path.read_text().splitlines()[1:] if ln.strip()]
    return [(int(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in rows if int(r[0]) <= start]


def _write_rows(path: Path, rows: list[tuple]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("step\tloss\tlr\timages_per_s\n" + "".join(f"{s}\t{lo:.6f}\t{lr:.3g}\t{ips:.2f}\n"
                                                         for s, lo, lr, ips in rows))
    os.replace(tmp, path)


def _export(rec: Recipe, model, ema: EMA, encoder: TextEncoder | None, output: str, st: Stage) -> None:
    """The EMA weights as a diffusers-style pipeline, plus a sample grid of the fixed prompts."""
    from fusedit.model.pipeline import FuseDiTPipeline

    cfg = dict(model.config)
    ema_model = FuseDiTTransformer(cfg["arch"], cfg["text"], sample_size=cfg["sample_size"])
    ema_model.load_state_dict({k: v.to(ema_model.dtype) for k, v in ema.shadow.items()})
    pipe = FuseDiTPipeline.from_recipe(rec, transformer=ema_model.eval())
    if encoder is not None:
        pipe.text_encoder.load_state_dict(encoder.llm.state_dict())
    local = output if not storage.is_s3(output) else str(Path(".fusedit-logs") / st.name / "export")
    pipe.save_pretrained(os.path.join(local, "pipeline"))
    images = pipe(st.sample_prompts, num_inference_steps=rec.flow.sample_steps, guidance_scale=rec.flow.guidance,
                  generator=torch.Generator().manual_seed(0)).images
    grid = _grid(images)
    grid.save(os.path.join(local, "samples.png"))
    if storage.is_s3(output):
        storage.publish(local, output)


def _grid(images):
    from PIL import Image

    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        out.paste(im, (i * w, 0))
    return out
