"""The torch device a step runs on, from a `--device` value (or the best one present)."""
from __future__ import annotations

import torch

from fusedit.errors import UserError


def parse_device(name: str) -> torch.device:
    """A --device value as a torch device; a misspelt or absent one is the user's error, named."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UserError(f"--device {name!r} is not a torch device ({str(exc).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def pick_device(device: str | None) -> torch.device:
    """`device`, or CUDA where there is one, else the CPU."""
    return parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
