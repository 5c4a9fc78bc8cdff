"""FID and KID: a set against itself is ~0, against a shifted set larger; the distance matches the closed form."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from fusedit.components import scenes
from fusedit.components.evals import fid, synthetic


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
