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
import signal
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fusedit.components.cache.reader import open_features
from fusedit.components.shared import storage
from fusedit.components.train import checkpoint, distributed
from fusedit.components.train.config import Stage, load_train_params
from fusedit.components.train.ema import EMA, ema_on_device
from fusedit.components.train.export import PipelineExport, held_parts
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
    strategy: str = "single"  # distributed.Dist.strategy (ddp, fsdp, hsdp, spmd); per rank: ranks/rank-<r>.json

    RUN_FACTS = ("output", "start_step", "images_per_s", "world", "strategy")

    def metrics(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.RUN_FACTS}

    def timing(self) -> dict:
        return {k: getattr(self, k) for k in self.RUN_FACTS}


class TrainedModule(nn.Module):
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


def _dit_part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _stage_output(output: str, init_from: str) -> str:
    """init_from is a sibling stage's name (beside our output) or a URI of its own."""
    if "/" in init_from:
        return init_from
    return storage.join(output.rstrip("/").rsplit("/", 1)[0], init_from)


def _tap_keys(batches, sink: list[str]):
    """The batches as they are; the first one's sample keys (this rank's slice) are copied to `sink`."""
    for batch in batches:
        if not sink:
            sink.extend(batch.keys)
        yield batch


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


def _build_denoiser(rec: Recipe, st: Stage, seed: int, d: distributed.Dist, cached_text: bool):
    """The DiT (seeded), the LLM when text is computed online, and whether the blocks are compiled."""
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
    encoder = None if cached_text else TextEncoder.load(m, spec)
    compiled = _compiles(st, d.device) and d.strategy != "spmd"
    text_len = None
    if d.strategy == "spmd" or compiled:  # one text length, one graph: the longest a caption can tokenize to
        tok = encoder.tokenizer if encoder is not None else load_tokenizer(m.tokenizer or m.llm)
        text_len = spec.max_length + (len(tok(spec.instruction, add_special_tokens=False).input_ids)
                                      if spec.instruction else 0)
    denoiser = TrainedModule(dit, encoder, text_len).to(d.device)
    if compiled:  # in place: parameter names (checkpoints, EMA) stay as they are
        for block in dit.blocks:
            block.compile(backend=COMPILE_BACKEND)
    return dit, encoder, denoiser, compiled


def _restore(st: Stage, output: str, dit: FuseDiTTransformer, ema: EMA, encoder: TextEncoder | None):
    """Load this stage's latest checkpoint (a resume, returned) or else its init_from stage's weights."""
    resume = checkpoint.load_latest(storage.join(output, "checkpoints"))
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
    return resume


class _Run:
    """One stage's live state, built once: the wrapped model, optimizer, LR schedule, EMA, logs and data.

    Invariant: every rank holds the same full weights before `distributed.wrap`, and a resumed run
    restores model, EMA, optimizer and schedule from one committed checkpoint, so step s sees the
    same state and the same draws whether or not the run was interrupted.
    """

    def __init__(self, rec: Recipe, st: Stage, seed: int, data: str, output: str, d: distributed.Dist):
        if st.batch_size % d.world:
            raise UserError(f"stage '{st.name}': batch_size {st.batch_size} is not divisible by {d.world} ranks")
        self.rec, self.st, self.seed, self.output, self.d = rec, st, seed, output, d
        self.local_batch = st.batch_size // d.world
        if d.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        train_llm = st.trains == "dit+llm"  # the LLM runs on the captions: cached text is never read
        self.features = open_features(rec, data, text=not train_llm, batch_size=self.local_batch, seed=seed,
                                            rank=d.rank, world=d.world,
                                            device="cpu" if d.strategy == "spmd" else str(d.device),
                                            max_bad_rate=st.max_bad_sample_rate)
        self.cached_text = self.features.uncond is not None and not train_llm
        if train_llm and self.features.uncond is not None:
            log.warning("stage '%s' trains the LLM: cached text features cannot be used (not read), computing them "
                        "online", st.name)
        self.dit, encoder, denoiser, self.compiled = _build_denoiser(rec, st, seed, d, self.cached_text)
        self.encoder = encoder
        self.llm_params = reachable_llm_params(encoder) if train_llm else []
        self.ema = EMA(self.dit.state_dict(), st.ema_decay)
        self.resume = _restore(st, output, self.dit, self.ema, encoder)
        units = list(self.dit.blocks) + ([layer for layer in encoder.llm.layers] if train_llm else [])
        self.model = distributed.wrap(denoiser, d, units)
        core = distributed.unwrap(self.model)
        self.groups = [{"params": list(core.dit.parameters()), "lr": st.lr}]
        if self.llm_params:
            self.groups.append({"params": [p for p in core.encoder.llm.parameters() if p.requires_grad],
                                "lr": st.llm_lr})
        self.opt = torch.optim.AdamW(self.groups, weight_decay=st.weight_decay,
                                     fused=d.device.type == "cuda" or None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, st.lr_factor)
        self.start = 0
        if self.resume is not None:
            distributed.load_optimizer_state(self.model, self.opt, self.resume.objects["optimizer"], d)
            self.sched.load_state_dict(self.resume.objects["scheduler"])
            self.start = self.resume.step
            log.info("resuming stage '%s' from step %d", st.name, self.start)
        self.flow = RectifiedFlow(rec.flow)
        self.logs = TrainLogs(output, st.name, self.start, d)
        self.uncond = self.features.uncond.to(d.device) if self.cached_text else None
        self.ema_placed = False

    def exporter(self) -> PipelineExport | None:
        """Rank 0's pipeline export, reusing the text encoder and VAE this run holds where they are whole
        (not sharded by FSDP / HSDP, not on an XLA mesh); None on the other ranks."""
        if not self.d.main:
            return None
        whole = self.d.strategy in ("single", "ddp")
        held = held_parts(self.encoder, getattr(self.features, "encoder", None)) if whole else {}
        return PipelineExport(self.rec, self.st, self.logs.root, held)

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        full = distributed.full_state(self.model, self.d)
        out = {"model": _dit_part(full, "dit.")}
        if self.llm_params:
            out["llm"] = _dit_part(full, "encoder.llm.")
        return out

    def live_weights(self) -> dict[str, torch.Tensor]:
        """The DiT's weights as they are (no copy) where they are whole; gathered under FSDP."""
        return self.weights()["model"] if self.d.sharded else distributed.unwrap(self.model).dit.state_dict()

    def save(self, step: int) -> None:
        loss_val = self.logs.settle()
        tensors = {**self.weights(), "ema": self.ema.state()}
        opt_state = distributed.optimizer_state(self.model, self.opt, self.d)
        if self.d.main:  # loss rows first: a kill between the two must not commit a step whose rows are lost
            self.logs.flush()  # (rows past the step a rerun resumes from are dropped by resume_rows)
            checkpoint.save(storage.join(self.output, "checkpoints"), step, tensors,
                            {"optimizer": opt_state, "scheduler": self.sched.state_dict()},
                            {"stage": self.st.name, "recipe": self.rec.name, "seed": self.seed,
                             "world": self.d.world, "loss": loss_val}, self.st.keep_last)
        distributed.barrier(self.d)

    def forward_backward(self, inputs: StepInputs) -> torch.Tensor:
        with _precision(self.st, self.d.device):
            loss = self.flow.loss(self.model, inputs.x0, inputs.text_or_captions(self.uncond), inputs.sigmas,
                                  inputs.noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step(self, step: int, inputs: StepInputs) -> torch.Tensor:
        """One optimizer step and its EMA update; a failed first compilation (compile: auto) is retried eagerly."""
        try:
            loss = self.forward_backward(inputs)
        except Exception as exc:
            retry = self.compiled and self.st.compile == "auto" and step == self.start and self.d.world == 1
            if not retry or isinstance(exc, torch.OutOfMemoryError):  # DDP: no retry
                raise
            self.compiled = _uncompile(self.dit, self.st.name, exc)
            loss = self.forward_backward(inputs)
        torch.nn.utils.clip_grad_norm_([p for gr in self.groups for p in gr["params"]], self.st.grad_clip)
        self.opt.step()
        self.sched.step()
        distributed.step_end(self.d)
        if (step + 1) % self.st.ema_every == 0:
            if not self.ema_placed and ema_on_device(self.st, self.d, self.ema):  # once the step's peak is known
                self.ema.place(self.d.device)
            self.ema_placed = True
            self.ema.update(self.live_weights())
        return loss

    def loop(self, exporter: PipelineExport | None) -> None:
        """Steps start..steps: log, sample, save every save_every, on the last step and on SIGTERM."""
        from tqdm import tqdm

        st, d, logs = self.st, self.d, self.logs
        self.model.train()
        first_keys: list[str] = []  # this rank's samples at its first step, for its rank record
        batches = _tap_keys(self.features.batches(self.start), first_keys)
        host = make_inputs(batches, self.start, st.batch_size, d.rank * self.local_batch, self.seed, self.flow,
                           self.rec.flow.caption_dropout, self.features.latent_shift, self.features.latent_scale,
                           self.cached_text)
        prefetch = Prefetch(host, st.prefetch, prepare=lambda x: x.pin() if d.device.type == "cuda" else x)
        bar = tqdm(range(self.start, st.steps), initial=self.start, total=st.steps, desc=st.name, disable=not d.main)
        t_log = time.perf_counter()
        with _SigtermFlag() as sigterm, prefetch:
            for step in bar:
                inputs = next(prefetch).to(d.device)
                loss = self.step(step, inputs)
                if step == self.start:  # what distribution meant for this rank: ranks/rank-<r>.json
                    logs.rank(distributed.rank_record(self.model, d, step + 1, first_keys))
                logs.step(step + 1, loss, self.sched.get_last_lr()[0], len(inputs.x0))
                if (step + 1) % st.log_every == 0:  # the only host sync of a step that neither saves nor samples
                    loss_val, now = logs.settle(), time.perf_counter()
                    bar.set_postfix(loss=f"{loss_val:.4f}", s_step=f"{(now - t_log) / st.log_every:.3f}",
                                    img_s=f"{logs.images_per_s:.1f}")
                    t_log = now
                if exporter and st.sample_every and (step + 1) % st.sample_every == 0 and step + 1 < st.steps:
                    exporter.grid(self.ema.state(), step + 1, logs)
                if (step + 1) % st.save_every == 0 or step + 1 == st.steps or sigterm.set:
                    self.save(step + 1)
                if sigterm.set and step + 1 < st.steps:
                    raise Preempted(f"stage '{st.name}': SIGTERM, checkpoint committed at step {step + 1}")

    def finish(self, exporter: PipelineExport | None) -> TrainResult:
        """The result, and on rank 0 the exported EMA pipeline, metrics.json and timing.json."""
        st, logs = self.st, self.logs
        loss_val = logs.settle()
        if self.start == st.steps and self.resume is not None:  # a rerun after the last save: only the export
            loss_val = float(self.resume.meta.get("loss", loss_val))
        result = TrainResult(self.output, st.name, self.start, st.steps, loss_val, logs.images_per_s,
                             sum(p.numel() for p in self.dit.parameters()), sum(p.numel() for p in self.llm_params),
                             self.d.world, self.features.bad.count, self.d.strategy)
        if self.features.bad.count:
            log.warning("stage '%s': %d unreadable sample(s) skipped", st.name, self.features.bad.count)
        final = self.weights()
        if exporter:
            exporter.export(self.ema.state(), final.get("llm"), self.output, st.steps, logs)
            for name, doc in (("metrics.json", result.metrics()), ("timing.json", result.timing())):
                storage.write_bytes(str(logs.root / name), json.dumps(doc, indent=2).encode())
            logs.close()
            if logs.remote:
                for name, doc in (("metrics.json", result.metrics()), ("timing.json", result.timing())):
                    storage.write_json(storage.join(self.output, name), doc)
        distributed.barrier(self.d)
        return result


def _train(rec: Recipe, st: Stage, seed: int, data: str, output: str, d: distributed.Dist) -> TrainResult:
    run = _Run(rec, st, seed, data, output, d)
    exporter = run.exporter()
    run.loop(exporter)
    return run.finish(exporter)
