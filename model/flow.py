"""Rectified flow: x_t = (1 - s) x0 + s eps, target eps - x0; logit-normal timesteps on SD3's shifted schedule."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from fusedit.model.config import FlowConfig
from fusedit.model.text import TextContext

Denoiser = Callable[[torch.Tensor, torch.Tensor, TextContext], torch.Tensor]


def make_scheduler(cfg: FlowConfig):
    """SD3's FlowMatchEulerDiscreteScheduler with the recipe's shift (used for training and sampling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)


class RectifiedFlow:
    def __init__(self, cfg: FlowConfig, scheduler=None):
        self.cfg = cfg
        self.scheduler = scheduler or make_scheduler(cfg)
        self.train_sigmas = make_scheduler(cfg).sigmas[:-1].clone()  # shifted, descending, one per timestep

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """u ~ logit-normal(mean, std) mapped to the index floor(u * T) of the shifted schedule."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", n, self.cfg.logit_mean, self.cfg.logit_std,
                                                  generator=generator)
        idx = (u * self.cfg.num_train_timesteps).long().clamp_max(self.cfg.num_train_timesteps - 1)
        return self.train_sigmas[idx].to(device)

    def loss(self, model: Denoiser, x0: torch.Tensor, text: TextContext, sigmas: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """MSE between the predicted and the true velocity (uniform weighting)."""
        s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_t = (1 - s) * x0 + s * noise
        pred = model(x_t, sigmas * self.cfg.num_train_timesteps, text)
        return F.mse_loss(pred.float(), (noise - x0).float())

    @torch.no_grad()
    def sample(self, model: Denoiser, cond: TextContext, uncond: TextContext | None, noise: torch.Tensor,
               steps: int | None = None, guidance: float | None = None, batched: bool = True) -> torch.Tensor:
        """Euler ODE from noise to x0 with classifier-free guidance uncond + g * (cond - uncond).

        batched: both guidance halves in one forward over [uncond ; cond] (else two forwards, same result).
        """
        steps = steps or self.cfg.sample_steps
        guidance = self.cfg.guidance if guidance is None else guidance
        kind = ("batched" if batched else "separate") if uncond is not None and guidance != 1.0 else "none"
        velocity = GUIDANCE[kind](model, cond, uncond, guidance)
        self.scheduler.set_timesteps(steps, device=noise.device)
        x = noise
        for t in self.scheduler.timesteps:
            v = velocity(x, t.expand(x.shape[0]).to(noise.device))
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return x


def _unguided(model: Denoiser, cond: TextContext, uncond, guidance: float):
    return lambda x, t: model(x, t, cond).to(x.dtype)


def _batched(model: Denoiser, cond: TextContext, uncond: TextContext, guidance: float):
    both = TextContext.cat([uncond, cond])  # made once: the key mask is then built once for all steps

    def velocity(x, t):
        v_u, v_c = model(torch.cat([x, x]), torch.cat([t, t]), both).to(x.dtype).chunk(2)
        return v_u + guidance * (v_c - v_u)

    return velocity


def _separate(model: Denoiser, cond: TextContext, uncond: TextContext, guidance: float):
    def velocity(x, t):
        v_u = model(x, t, uncond).to(x.dtype)
        return v_u + guidance * (model(x, t, cond).to(x.dtype) - v_u)

    return velocity


# guidance kind -> (model, cond, uncond, guidance) -> velocity(x, t)
GUIDANCE = {"none": _unguided, "batched": _batched, "separate": _separate}
