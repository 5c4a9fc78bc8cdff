"""The `fid` suite: FID (and KID) between generated images and a folder or shard set of real images.

The feature extractor is pluggable (`EXTRACTORS`): `inception` is clean-fid's TorchScript Inception
(`inception-2015-12-05.pt`, given by path: nothing is downloaded), fed as clean-fid's "clean" mode
feeds it (PIL bicubic resize to 299 in float, then (x - 128) / 128); `torchscript` takes any scripted
module; `random` is a seeded tiny conv net for smoke tests, whose numbers mean nothing outside a run.
Only clean-fid's Inception gives `fid` and `kid`; any other features name the metrics after themselves
(`fid_random32`, `fid_ts_<weights file>...`), since such a number is not comparable to published FIDs.
The Fréchet distance uses an eigendecomposition (no scipy); KID is clean-fid's unbiased polynomial MMD.
With no more images than feature dimensions the covariance is rank-deficient and FID is biased upwards:
`fid_n` records the count and the run warns.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusedit.components.evaluate.evals.base import SuiteContext, SuiteResult
from fusedit.components.evaluate.evals.prompts import read_named_prompts
from fusedit.components.evaluate.evals.sampling import Job, save_png
from fusedit.errors import UserError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_DIM = 2048  # clean-fid's pool3 features
log = logging.getLogger(__name__)


@dataclass
class Extractor:
    size: int  # input side in pixels
    forward: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, size, size) float in [0, 255] -> (B, D)
    name: str = "inception"  # "inception" only for clean-fid's Inception: the metrics are then fid and kid

    def metric(self, base: str) -> str:
        """`fid`/`kid` for clean-fid's Inception, else named after the features: `fid_random32`."""
        return base if self.name == "inception" else f"{base}_{self.name}"


def clean_resize(img: Image.Image, size: int) -> np.ndarray:
    """clean-fid's resize: each channel in float mode with PIL bicubic, clipped to [0, 255]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(arr[:, :, c], mode="F").resize((size, size), Image.Resampling.BICUBIC))
             for c in range(3)]
    return np.clip(np.stack(chans, 0), 0, 255)


def _inception(weights: str | None, device: torch.device) -> Extractor:
    if not weights or not Path(weights).is_file():
        raise UserError("--fid-features inception needs --fid-weights: the path of clean-fid's "
                        "inception-2015-12-05.pt (nothing is downloaded at run time)")
    net = torch.jit.load(weights, map_location=device).eval()
    layers = getattr(net, "layers", net)
    return Extractor(299, lambda x: layers((x - 128) / 128).reshape(x.shape[0], -1))


def _torchscript(weights: str | None, device: torch.device) -> Extractor:
    if not weights or not Path(weights).is_file():
        raise UserError("--fid-features torchscript needs --fid-weights: a TorchScript module file")
    net = torch.jit.load(weights, map_location=device).eval()
    size = int(os.environ.get("FUSEDIT_FID_SIZE", 299))
    stem = re.sub(r"[^a-z0-9]+", "_", Path(weights).stem.lower()).strip("_") or "module"
    return Extractor(size, lambda x: net(x / 127.5 - 1).flatten(1), f"ts_{stem}{size}")


def random_net(seed: int = 0, dim: int = 64) -> torch.nn.Module:
    """A tiny random conv net: enough to tell image distributions apart, not comparable across setups."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.GELU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.GELU(),
        torch.nn.Conv2d(32, dim, 3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def _random(weights: str | None, device: torch.device) -> Extractor:
    net = random_net().to(device)
    return Extractor(32, lambda x: net(x / 127.5 - 1), "random32")


EXTRACTORS: dict[str, Callable[[str | None, torch.device], Extractor]] = {
    "inception": _inception, "torchscript": _torchscript, "random": _random}


def extractor(name: str, weights: str | None = None, device: torch.device | str = "cpu") -> Extractor:
    if name not in EXTRACTORS:
        raise UserError(f"--fid-features {name!r}: unknown (one of {', '.join(EXTRACTORS)})")
    return EXTRACTORS[name](weights, torch.device(device))


@torch.no_grad()
def features(images: Iterable[Image.Image], ext: Extractor, batch: int = 32, device="cpu") -> np.ndarray:
    out, buf = [], []

    def flush():
        x = torch.from_numpy(np.stack(buf)).to(device)
        out.append(ext.forward(x).double().cpu().numpy())
        buf.clear()

    for img in images:
        buf.append(clean_resize(img, ext.size))
        if len(buf) == batch:
            flush()
    if buf:
        flush()
    if not out:
        raise UserError("FID: no images")
    return np.concatenate(out)


def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2)."""
    s1 = _sqrtm_psd(sigma1)
    inner = s1 @ sigma2 @ s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets (clean-fid's kernel_distance)."""
    d = f1.shape[1]
    m = min(len(f1), len(f2), subset_size)
    if m < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / subsets / m)


# ---------------------------------------------------------------- real images and prompts

def _is_shards(uri: str) -> bool:
    return uri.endswith(".tar") or "{" in uri or uri.startswith("s3://") or (
        Path(uri).is_dir() and (any(Path(uri).glob("*.tar")) or (Path(uri) / "manifest.json").is_file()))


def real_images(uri: str, limit: int | None = None) -> Iterable[Image.Image]:
    """Images of a folder (recursive) or of WebDataset shards (a filter output, pattern or prefix)."""
    import io

    from fusedit.components.shared.shards import image_member

    n = 0
    if _is_shards(uri):
        from fusedit.components.shared.shards import input_shards, read_samples

        for shard in input_shards(uri):
            for s in read_samples(shard):
                data = image_member(s.members)
                if data is None:
                    continue
                yield Image.open(io.BytesIO(data)).convert("RGB")
                n += 1
                if limit and n >= limit:
                    return
    else:
        p = Path(uri)
        if not p.is_dir():
            raise UserError(f"--fid-real {uri}: not a folder, shard set or .npz statistics file")
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXT)
        if not files:
            raise UserError(f"--fid-real {uri}: no images ({', '.join(IMAGE_EXT)}) in the folder")
        for f in files[:limit] if limit else files:
            with Image.open(f) as im:
                yield im.convert("RGB")


def _prompts(ctx: SuiteContext) -> list[tuple[str, str]]:
    cfg = ctx.cfg
    if not cfg.fid_real:
        raise UserError("suite fid needs --fid-real (a folder or shard set of real images, or an .npz of mu/sigma)")
    if cfg.fid_prompts:
        if cfg.fid_prompts.endswith(".json"):  # MJHQ-30K meta_data.json: {id: {"prompt", "category"}}
            from fusedit.components.evaluate.evals.prompts import check_names, read_text

            meta = json.loads(read_text(cfg.fid_prompts, "--fid-prompts"))
            pairs = check_names([(k, v["prompt"]) for k, v in sorted(meta.items())], "--fid-prompts",
                                cfg.fid_prompts)
        else:
            pairs = read_named_prompts(cfg.fid_prompts, "--fid-prompts")
    elif _is_shards(cfg.fid_real):  # the real set's own captions
        from fusedit.components.shared.shards import caption_of, input_shards, read_samples

        pairs = [(f"{i:06d}", caption_of(s, sh, "synthetic_caption"))
                 for i, (sh, s) in enumerate((sh, s) for sh in input_shards(cfg.fid_real) for s in read_samples(sh))]
    else:
        raise UserError("suite fid needs --fid-prompts when --fid-real is a folder (e.g. MJHQ-30K meta_data.json)")
    return pairs[: cfg.limit] if cfg.limit else pairs


def _outputs(out: Path, name: str, n: int) -> list[Path]:
    return [out / f"{name}.png"] if n == 1 else [out / f"{name}_{k}.png" for k in range(n)]


def prepare(ctx: SuiteContext) -> list[Job]:
    cfg = ctx.cfg
    if cfg.fid_features not in EXTRACTORS:
        raise UserError(f"--fid-features {cfg.fid_features!r}: unknown (one of {', '.join(EXTRACTORS)})")
    if cfg.fid_features != "random" and not (cfg.fid_weights and Path(cfg.fid_weights).is_file()):
        raise UserError(f"--fid-features {cfg.fid_features} needs --fid-weights: a local file (for inception, "
                        "clean-fid's inception-2015-12-05.pt; nothing is downloaded at run time)")
    out, n = ctx.samples("fid"), cfg.images_for("fid")
    jobs = []
    for i, (name, prompt) in enumerate(_prompts(ctx)):
        paths = _outputs(out, name, n)
        jobs.append(Job(prompt, cfg.seed + i, n, paths,
                        lambda imgs, paths=paths: [save_png(im, p) for im, p in zip(imgs, paths, strict=True)]))
    return jobs


def distances(gen: np.ndarray, mu: np.ndarray, sigma: np.ndarray, real: np.ndarray | None,
              ext: Extractor) -> tuple[dict[str, float], list[str]]:
    """FID (and KID when the real features are at hand) named after the features, with their caveats."""
    dim, fid_key = gen.shape[1], ext.metric("fid")
    if ext.name == "inception" and dim != INCEPTION_DIM:
        raise UserError(f"--fid-weights: gives {dim} features, not clean-fid Inception's {INCEPTION_DIM}; "
                        "pass --fid-features torchscript for other networks")
    if mu.shape != (dim,):
        raise UserError(f"--fid-real: reference statistics of {mu.shape[-1]} features, the extractor gives {dim}")
    n = min(len(gen), len(real)) if real is not None else len(gen)
    m = {fid_key: frechet(*stats(gen), mu, sigma), "fid_n": float(n)}
    if real is not None:
        m[ext.metric("kid")] = kid(gen, real)
    notes = []
    if ext.name != "inception":
        notes.append(f"{fid_key}: FID over {ext.name} features, not comparable to published FIDs "
                     "(those use clean-fid's Inception)")
    if n <= dim:
        msg = (f"{fid_key} over {n} images with {dim} feature dimensions: the covariance is rank-deficient "
               f"and the value biased upwards; use more than {dim} images")
        log.warning(msg)
        notes.append(msg)
    return m, notes


def score(ctx: SuiteContext) -> SuiteResult:
    cfg = ctx.cfg
    out, n = ctx.samples("fid"), cfg.images_for("fid")
    files = [p for name, _ in _prompts(ctx) for p in _outputs(out, name, n)]
    device = ctx.sampler.pipe._execution_device
    ext = extractor(cfg.fid_features, cfg.fid_weights, device)
    gen = features((Image.open(f) for f in files), ext, device=device)
    m: dict[str, float] = {"images": len(gen)}
    if cfg.fid_real.endswith(".npz"):
        ref = np.load(cfg.fid_real)
        mu, sigma, real = ref["mu"], ref["sigma"], None
    else:
        real = features(real_images(cfg.fid_real, cfg.fid_max_real), ext, device=device)
        mu, sigma = stats(real)
        m["real_images"] = len(real)
    scores, notes = distances(gen, mu, sigma, real, ext)
    return SuiteResult(m | scores, grids={"fid": files[:8]},
                       notes=[f"FID features: {cfg.fid_features} ({ext.size} px)", *notes])
