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


def held_parts(encoder, image_encoder) -> dict:
    """What a trainer holds of a pipeline: its text stream (`text`: a TextEncoder, the LLM trained or frozen)
    and its online path's VAE (`vae`); absent keys are parts it does not hold."""
    held = {"text": encoder} if encoder is not None else {}
    if image_encoder is not None and image_encoder.vae is not None:
        held["vae"] = image_encoder.vae
    return held


def assemble(rec: Recipe, held: dict):
    """`FuseDiTPipeline.from_recipe` with the `held` parts (the rest loaded from the recipe), on their device."""
    from fusedit.model.pipeline import FuseDiTPipeline

    pipe = FuseDiTPipeline.from_recipe(rec, **held)
    modules = [held["text"].llm] if "text" in held else []
    modules += [held["vae"]] if "vae" in held else []
    device = next((p.device for mod in modules for p in mod.parameters()), None)
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
        if llm is not None and "text" not in self.held:
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
