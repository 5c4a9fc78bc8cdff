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
               steps: int | None = None, guidance: float | None = None) -> torch.Tensor:
        """Euler ODE from noise to x0 with classifier-free guidance uncond + g * (cond - uncond)."""
        steps = steps or self.cfg.sample_steps
        guidance = self.cfg.guidance if guidance is None else guidance
        use_cfg = uncond is not None and guidance != 1.0
        text = TextContext.cat([uncond, cond]) if use_cfg else cond
        self.scheduler.set_timesteps(steps, device=noise.device)
        x = noise
        for t in self.scheduler.timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            v = model(inp, t.expand(inp.shape[0]).to(noise.device), text).to(x.dtype)
            if use_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return x
