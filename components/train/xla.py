"""The torch-xla path (TPU, or XLA on the CPU): SPMD, one process, the DiT sharded FSDP-style over a mesh.

`fusedit train --device xla` uses it through components/train/distributed.py. torch-xla pairs with its own
torch (2.9), so it lives in a second environment (`make xla-venv`, requirements-xla.txt); this module
imports it only when used, and says so clearly when it is missing. On the CPU, `PJRT_DEVICE=CPU` and
`CPU_NUM_DEVICES=4` give a 4-device mesh on which the annotations really shard.

Sharding: a (n_devices, 1) mesh with axes ("fsdp", "model"); every >=2-D parameter of the trainable DiT
is split along its largest dimension divisible by the device count (as the reference's SPMD FSDP does),
everything else (biases, norms, the frozen LLM) is replicated. The compiler propagates the rest.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from fusedit.errors import UserError

MESH_AXES = ("fsdp", "model")
_state: dict = {}


def _xla() -> SimpleNamespace:
    """The torch_xla modules, imported on first use."""
    if "mods" not in _state:
        try:
            import torch_xla
            import torch_xla.core.xla_model as xm
            import torch_xla.distributed.spmd as xs
            import torch_xla.runtime as xr
        except ModuleNotFoundError as e:
            raise UserError("--device xla needs torch-xla, which is not installed in this environment; "
                            "build the XLA environment with `make xla-venv` and run `.venv-xla/bin/fusedit` "
                            f"(torch-xla 2.9 pairs with torch 2.9, this is torch {torch.__version__})") from e
        except (ImportError, OSError) as e:  # e.g. torch-xla installed beside a torch it was not built for
            raise UserError(f"torch-xla is installed but does not load with torch {torch.__version__} ({e}); "
                            "use the XLA environment from `make xla-venv` (torch 2.9.1 + torch-xla 2.9.0)") from e
        _state["mods"] = SimpleNamespace(torch_xla=torch_xla, xm=xm, xs=xs, xr=xr)
    return _state["mods"]


def device() -> torch.device:
    """The XLA device, with SPMD enabled (before any tensor is placed on it)."""
    x = _xla()
    if not _state.get("spmd"):
        x.xr.use_spmd()
        _state["spmd"] = True
    return x.torch_xla.device()


def process_index() -> int:
    """This host's index in a multi-host slice (0 on a single host): only host 0 writes outputs."""
    return int(_xla().xr.process_index())


def mesh():
    """The global (n_devices, 1) ("fsdp", "model") mesh, built once."""
    x = _xla()
    if "mesh" not in _state:
        import numpy as np

        n = x.xr.global_runtime_device_count()
        _state["mesh"] = x.xs.Mesh(np.arange(n), (n, 1), MESH_AXES)
        x.xs.set_global_mesh(_state["mesh"])
    return _state["mesh"]


def fsdp_spec(shape: tuple[int, ...], n: int) -> tuple[str | None, ...] | None:
    """Partition spec that splits the largest dimension divisible by n over "fsdp"; None: replicate."""
    if len(shape) < 2 or n < 2:
        return None
    dims = [i for i, s in enumerate(shape) if s % n == 0]
    if not dims:
        return None
    dim = max(dims, key=lambda i: (shape[i], -i))
    return tuple("fsdp" if i == dim else None for i in range(len(shape)))


def shard(model: nn.Module) -> dict[str, tuple[str | None, ...]]:
    """Annotate the DiT's parameters (FSDP over the mesh); return {parameter name: partition spec}.

    `model` is the trainer's TrainedModule (its `dit` is sharded), or a bare module (all of it is).
    """
    x = _xla()
    m = mesh()
    n = m.size()
    dit = getattr(model, "dit", model)
    prefix = "dit." if dit is not model else ""
    specs = {}
    for name, p in dit.named_parameters():
        spec = fsdp_spec(tuple(p.shape), n)
        if spec is not None:
            x.xs.mark_sharding(p, m, spec)
            specs[prefix + name] = spec
    return specs


def sharding(t: torch.Tensor) -> str:
    """The sharding the runtime holds for a tensor ('' when replicated or unannotated)."""
    return _xla().torch_xla._XLAC._get_xla_sharding_spec(t)


def mark_step() -> None:
    """Cut and run the lazy graph (once per optimizer step)."""
    _xla().xm.mark_step()
