"""FID and KID: a set against itself is ~0, against a shifted set larger; the distance matches the closed form.
Only clean-fid's Inception features are called FID; small sets warn."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from fusedit.components.data import scenes
from fusedit.components.evaluate.evals import fid, synthetic
from fusedit.errors import UserError


def _feats(images):
    return fid.features(images, fid.extractor("random"))


def test_self_is_zero_and_shift_is_larger():
    imgs = [scenes.draw_scene(s["scene"]) for s in synthetic.prompts(8, seed=5, size=32)]
    a = _feats(imgs)
    mu, sigma = fid.stats(a)
    assert abs(fid.frechet(mu, sigma, mu, sigma)) < 1e-6
    dark = _feats([ImageEnhance.Brightness(i).enhance(0.6) for i in imgs])
    noisy = _feats([Image.fromarray(np.clip(np.asarray(i, float) + np.random.default_rng(0).normal(0, 60, (32, 32, 3)),
                                            0, 255).astype(np.uint8)) for i in imgs])
    d_dark, d_noisy = fid.frechet(*fid.stats(dark), mu, sigma), fid.frechet(*fid.stats(noisy), mu, sigma)
    assert d_dark > 1e-3 and d_noisy > 1e-3
    other = _feats([scenes.draw_scene(s["scene"]) for s in synthetic.prompts(8, seed=6, size=32)])
    assert fid.frechet(*fid.stats(other), mu, sigma) < min(d_dark, d_noisy)  # same distribution is closer
    assert abs(fid.kid(a, a)) < abs(fid.kid(dark, a))


def test_frechet_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5))
    s1, s2 = m @ m.T + np.eye(5), np.diag(rng.uniform(0.5, 2, 5))
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    w, v = np.linalg.eig(s1 @ s2)  # tr sqrt(S1 S2) = sum sqrt(eigenvalues of S1 S2), which are real and >= 0
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(w.real).sum()
    assert abs(fid.frechet(mu1, s1, mu2, s2) - expect) < 1e-8
    iso = fid.frechet(np.zeros(3), np.eye(3), np.zeros(3), 4 * np.eye(3))
    assert abs(iso - 3.0) < 1e-9  # 3 * (1 + 4 - 2 * 2)


def test_clean_resize_keeps_range_and_size():
    x = fid.clean_resize(Image.new("RGB", (40, 24), (255, 0, 10)), 16)
    assert x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 255
    assert np.allclose(x[0], 255) and np.allclose(x[2], 10, atol=0.01)


def _scripted(path, dim):
    import torch

    class Pool(torch.nn.Module):  # a TorchScript file giving `dim` features per image
        def __init__(self, dim: int):
            super().__init__()
            self.dim = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=[2, 3]).repeat(1, self.dim)[:, :self.dim] * torch.arange(1, self.dim + 1).to(x)

    torch.jit.script(Pool(dim)).save(str(path))
    return str(path)


def test_fid_on_other_features_is_named_after_them_and_small_sets_warn(caplog):
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
    m, notes = fid.distances(gen, *fid.stats(real), real, fid.extractor("random"))
    assert set(m) == {"fid_random32", "kid_random32", "fid_n"} and m["fid_n"] == 10
    assert m["fid_random32"] > 0
    assert notes[0] == ("fid_random32: FID over random32 features, not comparable to published FIDs "
                        "(those use clean-fid's Inception)")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["fid_random32 over 10 images with 64 feature dimensions: the covariance is rank-deficient "
                      "and the value biased upwards; use more than 64 images"] and notes[1] == warned[0]
    caplog.clear()
    many = rng.normal(size=(80, 64))
    m, notes = fid.distances(many, *fid.stats(many[::-1]), many, fid.extractor("random"))
    assert m["fid_n"] == 80 and len(notes) == 1 and not caplog.records  # more images than dimensions: no warning


def test_only_inception_features_are_called_fid(tmp_path):
    imgs = [Image.new("RGB", (24, 24), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    ext = fid.extractor("inception", _scripted(tmp_path / "inception-2015-12-05.pt", 2048))
    feats = fid.features(imgs, ext)
    m, notes = fid.distances(feats, *fid.stats(feats), None, ext)
    assert set(m) == {"fid", "fid_n"} and m["fid_n"] == 3
    assert not any("not comparable" in n for n in notes)
    other = fid.extractor("torchscript", _scripted(tmp_path / "My-DINO.v2.pt", 16))
    feats = fid.features(imgs, other)
    m, _ = fid.distances(feats, *fid.stats(feats), feats, other)
    assert set(m) == {"fid_ts_my_dino_v2299", "kid_ts_my_dino_v2299", "fid_n"}
    wrong = fid.extractor("inception", _scripted(tmp_path / "not-inception.pt", 16))
    with pytest.raises(UserError, match="gives 16 features, not clean-fid Inception's 2048"):
        fid.distances(fid.features(imgs, wrong), np.zeros(16), np.eye(16), None, wrong)
