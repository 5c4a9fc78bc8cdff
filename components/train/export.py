"""A stage's EMA weights as a full pipeline: sample grids during training and the exported pipeline.

The pipeline is assembled once, around a fresh transformer that takes the EMA weights, from the modules the
trainer already holds (`held`: its text encoder, trained or frozen, with its tokenizer and pooled encoder, and
the online path's VAE); only a part the trainer does not hold (a cached-text stage has no LLM, cached latents
need no VAE) is loaded from the recipe, once.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from fusedit.components.shared import storage
from fusedit.components.train.config import Stage
from fusedit.components.train.logs import TrainLogs
from fusedit.model.config import Recipe

TEXT_PARTS = ("text_encoder", "tokenizer", "pooled_text_encoder", "pooled_tokenizer")


def held_parts(encoder, image_encoder) -> dict:
    """The pipeline components a trainer holds: its TextEncoder's modules, and its ImageEncoder's VAE."""
    held = {}
    if encoder is not None:
        pooled = encoder.pooled
        held.update(text_encoder=encoder.llm, tokenizer=encoder.tokenizer,
                    pooled_text_encoder=pooled.model if pooled else None,
                    pooled_tokenizer=pooled.tokenizer if pooled else None)
    if image_encoder is not None:
        held["vae"] = image_encoder.vae
    return held


def assemble(rec: Recipe, held: dict):
    """A FuseDiTPipeline of a new transformer and the `held` components; the missing ones loaded from the recipe
    (as `FuseDiTPipeline.from_recipe` loads them). On the held modules' device."""
    from fusedit.model.config import resolve
    from fusedit.model.flow import make_scheduler
    from fusedit.model.pipeline import FuseDiTPipeline
    from fusedit.model.text import TextEncoder, llm_config_for
    from fusedit.model.transformer import FuseDiTTransformer

    m = rec.model
    arch, spec = resolve(m, llm_config_for(m.llm))
    parts = dict(held)
    if "text_encoder" not in parts:
        text = TextEncoder.load(m, spec)
        parts.update(held_parts(text, None))
    if "vae" not in parts:
        parts["vae"] = None
        if m.vae:
            from diffusers import AutoencoderKL

            parts["vae"] = AutoencoderKL.from_pretrained(m.vae, **({"subfolder": m.vae_subfolder}
                                                                   if m.vae_subfolder else {}))
    transformer = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=m.latent_size)
    pipe = FuseDiTPipeline(transformer=transformer, scheduler=make_scheduler(rec.flow), **parts)
    device = next((p.device for v in held.values() if isinstance(v, torch.nn.Module) for p in v.parameters()), None)
    return pipe.to(device) if device is not None else pipe


class PipelineExport:
    """The EMA weights in a full pipeline: sample grids of the stage's fixed prompts, and the final export.

    `held`: the components the trainer holds (`held_parts`), reused as they are. A held text encoder is the
    trainer's own (trained) LLM, so its weights are not loaded again at the export."""

    def __init__(self, rec: Recipe, st: Stage, root: Path, held: dict | None = None):
        self.rec, self.st, self.root, self.pipe = rec, st, root, None
        self.held = dict(held or {})

    def _pipeline(self, ema: dict[str, torch.Tensor], llm: dict | None):
        if self.pipe is None:
            self.pipe = assemble(self.rec, self.held)
        self.pipe.transformer.load_state_dict({k: v.to(self.pipe.transformer.dtype) for k, v in ema.items()})
        if llm is not None and "text_encoder" not in self.held:
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
