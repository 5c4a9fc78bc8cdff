"""The EMA of the DiT weights and where it lives (host or beside the weights)."""
from __future__ import annotations

import torch

from fusedit.components.train import distributed
from fusedit.components.train.config import Stage


class EMA:
    """Exponential moving average of the DiT weights (full, fp32), updated every N steps.

    It starts on the host; `place` can move it beside the weights, where an update is one fused lerp
    instead of a copy of every weight to the host (seconds per update at 2.5 B parameters).
    """

    def __init__(self, weights: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().cpu().clone() for k, v in weights.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.shadow.values())

    def place(self, device: torch.device) -> None:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        names = list(self.shadow)
        dev = self.shadow[names[0]].device
        torch._foreach_lerp_([self.shadow[k] for k in names],
                             [weights[k].detach().to(dev, torch.float32) for k in names], 1 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """Host copies, for checkpoints and sample pipelines."""
        return {k: v.cpu() for k, v in self.shadow.items()}


def ema_on_device(st: Stage, d: distributed.Dist, ema: EMA) -> bool:
    """Where the EMA lives: beside unsharded weights on a GPU when the memory left after the steps so far
    holds it with 2 GiB to spare (auto), on the host under FSDP/HSDP (it is kept whole)."""
    if st.ema_device == "host" or d.device.type != "cuda" or d.sharded:
        return False
    if st.ema_device == "device":
        return True
    left = torch.cuda.get_device_properties(d.device).total_memory - torch.cuda.max_memory_reserved(d.device)
    return left > ema.nbytes + 2 * 2**30
