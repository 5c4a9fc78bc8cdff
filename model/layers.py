"""Small building blocks shared by the DiT: norms, GeGLU MLP, modulation."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.RMSNorm):
    """Per-channel RMSNorm (eps 1e-6), as in Gemma's layers."""

    def __init__(self, dim: int, affine: bool = True):
        super().__init__(dim, eps=1e-6, elementwise_affine=affine)


class GeGLU(nn.Module):
    """Gemma's MLP: gelu(tanh)(gate) * up, then down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def modulate(x: torch.Tensor, shift, scale) -> torch.Tensor:
    return x * (1 + scale) + shift


def norm_or_identity(enabled: bool, dim: int) -> nn.Module:
    return RMSNorm(dim) if enabled else nn.Identity()


# ---- optional FP8 matmuls (Hopper): per-tensor scaled e4m3 forward, e5m2 gradients -------------

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaling to the format's full range: x ~= x8.float() * inverse (the scale _scaled_mm takes)."""
    top = torch.finfo(dtype).max
    scale = top / x.detach().abs().amax().float().clamp_min(1e-12)
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def scaled_mm(a: torch.Tensor, a_inv, b: torch.Tensor, b_inv, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) row-major @ (K, N) column-major in FP8 with fp32 accumulation (replaced by an emulator in tests)."""
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w.T with x, w in e4m3; grad_x = g @ w and grad_w = g.T @ x with g in e5m2."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return scaled_mm(x8, x_inv, w8.t(), w_inv, out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(g.contiguous(), E5M2)
        grad_x = scaled_mm(g8, g_inv, w8.t().contiguous().t(), w_inv, ctx.x_dtype)
        grad_w = scaled_mm(g8.t().contiguous(), g_inv, x8.t().contiguous().t(), x_inv, ctx.w_dtype)
        return grad_x, grad_w, None


def fp8_hardware() -> bool:
    """FP8 tensor cores: a CUDA device of compute capability 8.9 or more (Ada, Hopper and later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def fp8_shaped(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """_scaled_mm wants every matmul dimension a multiple of 16."""
    return x.numel() // x.shape[-1] % 16 == 0 and all(n % 16 == 0 for n in weight.shape)


class Fp8Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose matmul runs in FP8 where the hardware has it."""

    fp8 = False  # decided once by fp8_linears (no device query in the traced forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fp8 and fp8_shaped(x, self.weight)):
            return super().forward(x)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):  # the scaling is done here, in fp32
            y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, out_dtype)
        y = y.unflatten(0, x.shape[:-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)


def fp8_linears(module: nn.Module, enabled: bool | None = None) -> int:
    """Turn every nn.Linear under module into an Fp8Linear in place (parameters kept); how many.

    enabled None: FP8 where the hardware has it, else the plain matmul (the same numbers as nn.Linear).
    """
    on = fp8_hardware() if enabled is None else enabled
    linears = [m for m in module.modules() if type(m) in (nn.Linear, Fp8Linear)]
    for m in linears:
        m.__class__, m.fp8 = Fp8Linear, on
    return len(linears)
