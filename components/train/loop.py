"""One training stage: rectified flow on the DiT (optionally the LLM too), resumable to the exact loss.

Every random draw of step s comes from a generator seeded by (seed, s) for the whole global batch,
and each rank takes its slice, as it takes its slice of the batch itself (components/cache/reader.py). So resuming
needs only the committed checkpoint (model, EMA, optimizer, LR schedule), and N ranks see exactly
the draws one process would.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusedit.components.shared import storage
from fusedit.components.train import checkpoint, distributed
from fusedit.components.train.config import Stage, load_train_params
from fusedit.components.train.logs import TrainLogs
from fusedit.components.train.step_inputs import Prefetch, StepInputs, make_inputs
from fusedit.errors import UserError
from fusedit.model.config import Recipe, load_recipe, resolve
from fusedit.model.flow import RectifiedFlow
from fusedit.model.layers import fp8_hardware
from fusedit.model.text import TextContext, TextEncoder, llm_config_for, load_tokenizer
from fusedit.model.transformer import FuseDiTTransformer

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved on SIGTERM, rerun to resume
COMPILE_BACKEND = "inductor"


class Preempted(Exception):
    """SIGTERM arrived: the step finished and a checkpoint was committed."""


@dataclass
class TrainResult:
    """A stage's outcome. `metrics()` is what the inputs decide (metrics.json, DVC-tracked); `timing()` is
    how this run went (throughput, resumed step, ranks: timing.json, never tracked)."""

    output: str
    stage: str
    start_step: int
    steps: int
    final_loss: float
    images_per_s: float
    trainable_params: int
    llm_trainable_params: int
    world: int
    bad_samples: int = 0  # skipped by this run (rank 0's share): unreadable since filtering/caching

    RUN_FACTS = ("output", "start_step", "images_per_s", "world")

    def metrics(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.RUN_FACTS}

    def timing(self) -> dict:
        return {k: getattr(self, k) for k in self.RUN_FACTS}


class Denoiser(nn.Module):
    """The trained module: the DiT, plus the LLM when text is computed online (joint fine-tuning)."""

    def __init__(self, dit: FuseDiTTransformer, encoder: TextEncoder | None, text_len: int | None = None):
        super().__init__()
        self.dit, self.encoder = dit, encoder
        self.text_len = text_len  # pad every batch's text to this length (XLA compiles one graph per shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextContext | list[str]) -> torch.Tensor:
        ctx = text if isinstance(text, TextContext) else self.encoder.encode(text)
        return self.dit(x, t, ctx.pad_to(self.text_len) if self.text_len else ctx)


def reachable_llm_params(encoder: TextEncoder) -> list[nn.Parameter]:
    """LLM parameters a gradient can reach through the text features the DiT reads (probed once).

    The last shared layer's query/output projections and MLP, the final norm and anything after it
    never influence those features: they stay frozen and out of the optimizer.
    """
    llm = encoder.llm
    llm.requires_grad_(True)
    probe = encoder.encode(["a probe caption"])
    feats = [t for t in probe.tensors().values() if t.dtype.is_floating_point and t.requires_grad]
    sum(f.float().sum() for f in feats).backward()
    reach = {id(p) for p in llm.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for p in llm.parameters():
        p.grad = None
        p.requires_grad_(id(p) in reach)
    return [p for p in llm.parameters() if p.requires_grad]


class EMA:
    """Exponential moving average of the DiT weights (full, fp32), updated every N steps.

    It starts on the host; `place` can move it beside the weights, where an update is one fused lerp
    instead of a copy of every weight to the host (seconds per update at 2.5 B parameters).
    """

    def __init__(self, weights: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().cpu().clone() for k, v in weights.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.shadow.values())

    def place(self, device: torch.device) -> None:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        names = list(self.shadow)
        dev = self.shadow[names[0]].device
        torch._foreach_lerp_([self.shadow[k] for k in names],
                             [weights[k].detach().to(dev, torch.float32) for k in names], 1 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """Host copies, for checkpoints and sample pipelines."""
        return {k: v.cpu() for k, v in self.shadow.items()}


def _ema_on_device(st: Stage, d: distributed.Dist, ema: EMA) -> bool:
    """Where the EMA lives: beside unsharded weights on a GPU when the memory left after the steps so far
    holds it with 2 GiB to spare (auto), on the host under FSDP/HSDP (it is kept whole)."""
    if st.ema_device == "host" or d.device.type != "cuda" or d.sharded:
        return False
    if st.ema_device == "device":
        return True
    left = torch.cuda.get_device_properties(d.device).total_memory - torch.cuda.max_memory_reserved(d.device)
    return left > ema.nbytes + 2 * 2**30


def _dit_part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


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


def _compiles(stage: Stage, device: torch.device) -> bool:
    return stage.compile == "blocks" or (stage.compile == "auto" and device.type == "cuda")


def _uncompile(dit: FuseDiTTransformer, stage: str, exc: Exception) -> bool:
    """Undo `Module.compile` on every block after a failed compilation (compile: auto); False."""
    cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc  # dynamo wraps the compiler's error
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    log.warning("stage '%s': compiling the DiT blocks failed (%s: %s); training eagerly instead",
                stage, type(cause).__name__, first)
    for block in dit.blocks:
        block._compiled_call_impl = None
    return False


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
    d = distributed.setup(device, st.strategy, st.shard_group)
    try:
        return _train(rec, st, tp.seed, data, output, d)
    finally:
        distributed.teardown(d)


def _train(rec: Recipe, st: Stage, seed: int, data: str, output: str, d: distributed.Dist) -> TrainResult:
    if st.batch_size % d.world:
        raise UserError(f"stage '{st.name}': batch_size {st.batch_size} is not divisible by {d.world} ranks")
    local_batch = st.batch_size // d.world
    if d.device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    m = rec.model
    arch, spec = resolve(m, llm_config_for(m.llm))
    torch.manual_seed(seed)
    dit = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=m.latent_size)
    if st.activation_checkpointing:  # recompute each block in the backward: less memory, a bigger batch fits
        dit.enable_gradient_checkpointing()
    if st.fp8_matmuls:
        n = dit.use_fp8_matmuls()
        log.info("stage '%s': %d projections %s", st.name, n,
                 "in FP8" if fp8_hardware() else "left in full precision (this device has no FP8 matmul)")
    train_llm = st.trains == "dit+llm"

    from fusedit.components.cache.reader import open_features

    features = open_features(rec, data, batch_size=local_batch, seed=seed, rank=d.rank, world=d.world,
                             device="cpu" if d.strategy == "spmd" else str(d.device),
                             max_bad_rate=st.max_bad_sample_rate)
    cached_text = features.uncond is not None and not train_llm
    if train_llm and features.uncond is not None:
        log.warning("stage '%s' trains the LLM: cached text features cannot be used, computing them online",
                    st.name)
    encoder = None
    if not cached_text:
        encoder = TextEncoder.load(m, spec)
    llm_params = reachable_llm_params(encoder) if train_llm else []
    compiled = _compiles(st, d.device) and d.strategy != "spmd"
    text_len = None
    if d.strategy == "spmd" or compiled:  # one text length, one graph: the longest a caption can tokenize to
        tok = encoder.tokenizer if encoder is not None else load_tokenizer(m.tokenizer or m.llm)
        text_len = spec.max_length + (len(tok(spec.instruction, add_special_tokens=False).input_ids)
                                      if spec.instruction else 0)
    denoiser = Denoiser(dit, encoder, text_len).to(d.device)
    if compiled:  # in place: parameter names (checkpoints, EMA) stay as they are
        for block in dit.blocks:
            block.compile(backend=COMPILE_BACKEND)

    ema = EMA(dit.state_dict(), st.ema_decay)
    ckpt_root = storage.join(output, "checkpoints")
    resume = checkpoint.load_latest(ckpt_root)
    init = resume
    if resume is None and st.init_from:
        init = checkpoint.load_latest(storage.join(_stage_output(output, st.init_from), "checkpoints"))
        if init is None:
            raise UserError(f"stage '{st.name}': init_from '{st.init_from}' has no committed checkpoint")
    if init is not None:  # weights before sharding: every rank holds the full state
        dit.load_state_dict(init.tensors["model"])
        ema.shadow = {k: v.clone().float() for k, v in init.tensors["ema"].items()}
        if encoder is not None and "llm" in init.tensors:
            encoder.llm.load_state_dict(init.tensors["llm"], strict=False)

    units = list(dit.blocks) + ([layer for layer in encoder.llm.layers] if train_llm else [])
    model = distributed.wrap(denoiser, d, units)
    core = distributed.unwrap(model)
    groups = [{"params": list(core.dit.parameters()), "lr": st.lr}]
    if llm_params:
        groups.append({"params": [p for p in core.encoder.llm.parameters() if p.requires_grad], "lr": st.llm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=st.weight_decay, fused=d.device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / st.warmup_steps) if st.warmup_steps else 1.0)
    start = 0
    if resume is not None:
        distributed.load_optimizer_state(model, opt, resume.objects["optimizer"], d)
        sched.load_state_dict(resume.objects["scheduler"])
        start = resume.step
        log.info("resuming stage '%s' from step %d", st.name, start)
    flow = RectifiedFlow(rec.flow)
    logs = TrainLogs(output, st.name, start, d)
    uncond = features.uncond.to(d.device) if cached_text else None

    def weights() -> dict[str, dict[str, torch.Tensor]]:
        full = distributed.full_state(model, d)
        out = {"model": _dit_part(full, "dit.")}
        if llm_params:
            out["llm"] = _dit_part(full, "encoder.llm.")
        return out

    def live_weights() -> dict[str, torch.Tensor]:
        """The DiT's weights as they are (no copy) where they are whole; gathered under FSDP."""
        return weights()["model"] if d.sharded else core.dit.state_dict()

    def save(step: int) -> None:
        loss_val = logs.settle()
        tensors = {**weights(), "ema": ema.state()}
        opt_state = distributed.optimizer_state(model, opt, d)
        if d.main:  # loss rows first: a kill between the two must not commit a step whose rows are lost
            logs.flush()  # (rows past the step a rerun resumes from are dropped by resume_rows)
            checkpoint.save(ckpt_root, step, tensors, {"optimizer": opt_state, "scheduler": sched.state_dict()},
                            {"stage": st.name, "recipe": rec.name, "seed": seed, "world": d.world,
                             "loss": loss_val}, st.keep_last)
        distributed.barrier(d)

    def forward_backward(inputs: StepInputs) -> torch.Tensor:
        with _precision(st, d.device):
            loss = flow.loss(model, inputs.x0, inputs.text_or_captions(uncond), inputs.sigmas, inputs.noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    from tqdm import tqdm

    sampler = _Sampler(rec, st, logs.root) if d.main else None
    model.train()
    host = make_inputs(features.batches(start), start, st.batch_size, d.rank * local_batch, seed, flow,
                       rec.flow.caption_dropout, features.latent_shift, features.latent_scale, cached_text)
    prefetch = Prefetch(host, st.prefetch, prepare=lambda x: x.pin() if d.device.type == "cuda" else x)
    bar = tqdm(range(start, st.steps), initial=start, total=st.steps, desc=st.name, disable=not d.main)
    t_log, ema_placed = time.perf_counter(), False
    with _SigtermFlag() as sigterm, prefetch:
        for step in bar:
            inputs = next(prefetch).to(d.device)
            try:
                loss = forward_backward(inputs)
            except Exception as exc:  # only a failed compilation under compile: auto is retried, eagerly
                retry = compiled and st.compile == "auto" and step == start and d.world == 1  # DDP: no retry
                if not retry or isinstance(exc, torch.OutOfMemoryError):
                    raise
                compiled = _uncompile(dit, st.name, exc)
                loss = forward_backward(inputs)
            torch.nn.utils.clip_grad_norm_([p for gr in groups for p in gr["params"]], st.grad_clip)
            opt.step()
            sched.step()
            distributed.step_end(d)
            if (step + 1) % st.ema_every == 0:
                if not ema_placed and _ema_on_device(st, d, ema):  # decided once the step's peak is known
                    ema.place(d.device)
                ema_placed = True
                ema.update(live_weights())
            logs.step(step + 1, loss, sched.get_last_lr()[0], len(inputs.x0))
            if (step + 1) % st.log_every == 0:  # the only host sync of a step that neither saves nor samples
                loss_val, now = logs.settle(), time.perf_counter()
                bar.set_postfix(loss=f"{loss_val:.4f}", s_step=f"{(now - t_log) / st.log_every:.3f}",
                                img_s=f"{logs.images_per_s:.1f}")
                t_log = now
            if sampler and st.sample_every and (step + 1) % st.sample_every == 0 and step + 1 < st.steps:
                sampler.grid(ema.state(), step + 1, logs)
            if (step + 1) % st.save_every == 0 or step + 1 == st.steps or sigterm.set:
                save(step + 1)
            if sigterm.set and step + 1 < st.steps:
                raise Preempted(f"stage '{st.name}': SIGTERM, checkpoint committed at step {step + 1}")
    loss_val = logs.settle()
    if start == st.steps and resume is not None:  # a rerun after the last save: only the export is left
        loss_val = float(resume.meta.get("loss", loss_val))
    result = TrainResult(output, st.name, start, st.steps, loss_val, logs.images_per_s,
                         sum(p.numel() for p in dit.parameters()), sum(p.numel() for p in llm_params), d.world,
                         features.bad.count)
    if features.bad.count:
        log.warning("stage '%s': %d unreadable sample(s) skipped", st.name, features.bad.count)
    final = weights()
    if d.main:
        sampler.export(ema.state(), final.get("llm"), output, st.steps, logs)
        for name, doc in (("metrics.json", result.metrics()), ("timing.json", result.timing())):
            storage.write_bytes(str(logs.root / name), json.dumps(doc, indent=2).encode())
        logs.close()
        if logs.remote:
            for name, doc in (("metrics.json", result.metrics()), ("timing.json", result.timing())):
                storage.write_json(storage.join(output, name), doc)
    distributed.barrier(d)
    return result


class _Sampler:
    """The EMA weights in a full pipeline: sample grids of the fixed prompts, and the final export."""

    def __init__(self, rec: Recipe, st: Stage, root: Path):
        self.rec, self.st, self.root, self.pipe = rec, st, root, None

    def _pipeline(self, ema: dict[str, torch.Tensor], llm: dict | None):
        from fusedit.model.pipeline import FuseDiTPipeline

        if self.pipe is None:
            self.pipe = FuseDiTPipeline.from_recipe(self.rec)
        self.pipe.transformer.load_state_dict({k: v.to(self.pipe.transformer.dtype) for k, v in ema.items()})
        if llm is not None:
            self.pipe.text_encoder.load_state_dict(llm, strict=False)
        self.pipe.transformer.eval()
        return self.pipe

    def grid(self, ema: dict[str, torch.Tensor], step: int, logs: TrainLogs, llm: dict | None = None) -> Path:
        pipe = self._pipeline(ema, llm)
        images = pipe(self.st.sample_prompts, num_inference_steps=self.rec.flow.sample_steps,
                      guidance_scale=self.rec.flow.guidance, generator=torch.Generator().manual_seed(0)).images
        grid = _grid(images)
        path = self.root / "samples" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        logs.tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return path

    def export(self, ema: dict[str, torch.Tensor], llm: dict | None, output: str, step: int, logs: TrainLogs) -> None:
        """The EMA weights as a diffusers-style pipeline, plus the final sample grid.

        The pipeline is written beside its final name and renamed into place (on S3 its
        model_index.json goes last), so a killed export never leaves a pipeline that looks whole.
        """
        grid = self.grid(ema, step, logs, llm)
        local = output if not storage.is_s3(output) else str(self.root / "export")
        final = os.path.join(local, "pipeline")
        for stale in (final + ".part", final + ".old"):
            shutil.rmtree(stale, ignore_errors=True)
        self.pipe.save_pretrained(final + ".part")
        if os.path.isdir(final):
            os.replace(final, final + ".old")
        os.replace(final + ".part", final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        storage.upload_file(str(grid), os.path.join(local, "samples.png"))
        if storage.is_s3(output):
            storage.publish(local, output, last=("pipeline/model_index.json",))


def _grid(images):
    from PIL import Image

    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        out.paste(im, (i * w, 0))
    return out
