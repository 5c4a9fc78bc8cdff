"""The `clipscore` suite: CLIP score = 100 * max(cos(image, text), 0), averaged (torchmetrics' definition).

CLIP comes by name or path through transformers' `CLIPModel`; images are preprocessed as CLIP's
processor does (bicubic resize of the short side, centre crop, mean/std from preprocessor_config.json
when present), without the image-processor classes, so no torchvision is needed. Prompts come from
`clip_prompts`, or else are the synthetic suite's held-out prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusedit.components.evaluate.evals import synthetic
from fusedit.components.evaluate.evals.base import SuiteContext, SuiteResult
from fusedit.components.evaluate.evals.prompts import read_named_prompts
from fusedit.components.evaluate.evals.sampling import Job, save_png
from fusedit.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _prompts(ctx: SuiteContext) -> list[tuple[str, str]]:
    cfg = ctx.cfg
    if cfg.clip_prompts:
        pairs = read_named_prompts(cfg.clip_prompts, "--clip-prompts")
    else:
        specs = synthetic.prompts(cfg.synthetic_per_category, cfg.synthetic_seed, ctx.sampler.size)
        pairs = [(f"{i:05d}", s["prompt"]) for i, s in enumerate(specs)]
    return pairs[: cfg.limit] if cfg.limit else pairs


def prepare(ctx: SuiteContext) -> list[Job]:
    if not ctx.cfg.clip_model:
        raise UserError("suite clipscore needs --clip-model (a CLIP model name or local path)")
    out = ctx.samples("clipscore")
    return [Job(p, ctx.cfg.seed + i, 1, [out / f"{n}.png"], lambda imgs, path=out / f"{n}.png": save_png(imgs[0], path))
            for i, (n, p) in enumerate(_prompts(ctx))]


class Clip:
    def __init__(self, name: str, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(name).to(device).eval()
            self.tok = AutoTokenizer.from_pretrained(name)
        except OSError as exc:
            raise UserError(f"--clip-model {name}: cannot load a CLIP model ({exc})") from None
        self.device = device
        vc = self.model.config.vision_config
        pre = Path(name) / "preprocessor_config.json"
        p = json.loads(pre.read_text()) if pre.is_file() else {}
        self.size = int(vc.image_size)
        self.mean = torch.tensor(p.get("image_mean", CLIP_MEAN)).view(3, 1, 1)
        self.std = torch.tensor(p.get("image_std", CLIP_STD)).view(3, 1, 1)

    def pixels(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        s = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.Resampling.BICUBIC)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def scores(self, images: list[Image.Image], texts: list[str], batch: int = 32) -> list[float]:
        out = []
        limit = min(self.tok.model_max_length, self.model.config.text_config.max_position_embeddings)
        for i in range(0, len(images), batch):
            px = torch.stack([self.pixels(im) for im in images[i:i + batch]]).to(self.device)
            t = self.tok(texts[i:i + batch], padding=True, truncation=True, max_length=limit, return_tensors="pt")
            img = self.model.get_image_features(pixel_values=px)
            txt = self.model.get_text_features(**{k: v.to(self.device) for k, v in t.items()})
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            out += (100 * cos.clamp(min=0)).tolist()
        return out


def score(ctx: SuiteContext) -> SuiteResult:
    pairs = _prompts(ctx)
    out = ctx.samples("clipscore")
    clip = Clip(ctx.cfg.clip_model, ctx.sampler.pipe._execution_device)
    s = clip.scores([Image.open(out / f"{n}.png") for n, _ in pairs], [p for _, p in pairs])
    return SuiteResult({"clip_score": float(np.mean(s)), "images": len(s)},
                       grids={"clipscore": [out / f"{n}.png" for n, _ in pairs[:8]]})
