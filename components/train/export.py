"""A stage's EMA weights as a full pipeline: sample grids during training and the exported pipeline."""
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


class PipelineExport:
    """The EMA weights in a full pipeline: sample grids of the stage's fixed prompts, and the final export."""

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
