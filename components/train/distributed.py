"""Multi-process training on torch.distributed: torchrun launches, DDP or FSDP2 (`fully_shard`) wraps.

One `Dist` describes this process; the helpers here hide the few places where the strategies differ
(wrapping, full state dicts for checkpoints, reductions for logging). Nothing here is home-made
communication: it is torch.distributed's process group, DDP and FSDP2.

What distribution meant for a run is recorded by each rank itself, at its first step (numbered as in
loss.tsv), in `<output>/ranks/rank-<r>.json` (`rank_record`; r is the rank, or the host index under
SPMD): world size, strategy, the device mesh of sharded parameters (`[2]` under FSDP over 2 ranks,
`[replicas, shard_group]` under HSDP), the keys of the samples this rank trained on at that step (its
slice of the global batch, taken from the batch actually read), and the local vs full shape of the
DiT's first weight matrix inside a block and outside them (FSDP2 wraps each block, then the root). Under
FSDP2 a local shard is a dim-0 chunk; DDP replicas, and HSDP replicas of one-rank shard groups, hold
parameters whole. A resumed run rewrites it for its own first step; like timing.json it is a run fact
(never tracked by DVC). Ranks of an earlier run with a larger world are not removed: check `world`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from fusedit.components.shared.device import parse_device

Strategy = Literal["auto", "ddp", "fsdp", "hsdp"]


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    strategy: str  # "single", "ddp", "fsdp", "hsdp" or "spmd"
    host: int = 0  # SPMD over a multi-host slice: this host's index (every host runs the same program)
    shard_group: int | None = None  # hsdp: ranks that shard one replica (default: torchrun's LOCAL_WORLD_SIZE)

    @property
    def sharded(self) -> bool:
        """FSDP2 over all ranks, or HSDP (sharded within a group, replicated across groups)."""
        return self.strategy in ("fsdp", "hsdp")

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, logs and samples."""
        return self.rank == 0 and self.host == 0

def setup(device: str | None, strategy: Strategy = "auto", shard_group: int | None = None) -> Dist:
    """Read torchrun's environment; start the process group when there are several ranks.

    `device="xla"` selects the torch-xla SPMD path (TPU, or XLA on the CPU): one process drives every
    device of the mesh and the model is sharded by annotation (see components/train/xla.py).
    """
    if device == "xla":
        from fusedit.components.train import xla

        # one program per host; each host feeds the whole global batch and the runtime keeps its own shards
        return Dist(0, 1, xla.device(), "spmd", host=xla.process_index())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return Dist(0, 1, dev, "single")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev, "ddp" if strategy == "auto" else strategy, shard_group=shard_group)


def wrap(model: nn.Module, d: Dist, shard_units: list[nn.Module]) -> nn.Module:
    """DDP replicates; FSDP2 shards each unit (DiT block, trainable LLM layer), then the root."""
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.sharded:
        from torch.distributed.fsdp import fully_shard

        mesh = hsdp_mesh(d) if d.strategy == "hsdp" else None
        for unit in shard_units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if d.strategy == "spmd":
        from fusedit.components.train import xla

        xla.shard(model)
    return model


def hsdp_mesh(d: Dist):
    """(replicas, shard_group) device mesh: parameters sharded within a group (a node, over NVLink) and
    replicated across groups, so only gradient shards cross the slower network between nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    from fusedit.errors import UserError

    group = d.shard_group or int(os.environ.get("LOCAL_WORLD_SIZE", d.world))
    if group <= 0 or d.world % group:
        raise UserError(f"strategy hsdp: {d.world} ranks do not split into shard groups of {group} (shard_group)")
    return init_device_mesh(d.device.type, (d.world // group, group), mesh_dim_names=("replicate", "shard"))


def step_end(d: Dist) -> None:
    """Cut the lazy graph after each optimizer step on XLA; nothing elsewhere."""
    if d.strategy == "spmd":
        from fusedit.components.train import xla

        xla.mark_step()


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def full_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on every rank (a collective under FSDP)."""
    if d.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_state(model: nn.Module, sd: dict[str, torch.Tensor], d: Dist) -> None:
    if d.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        unwrap(model).load_state_dict(sd, strict=False)


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    if d.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    state = opt.state_dict()
    if d.strategy == "spmd":  # XLA tensors would pickle as device tensors: checkpoints hold CPU ones
        state["state"] = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                          for i, s in state["state"].items()}
    return state


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    """Restore a checkpoint's optimizer state. Any world size resumes any other, but a state saved
    sharded (fsdp/hsdp: keyed by parameter name) and one saved unsharded (keyed by index) do not mix."""
    by_name = any(isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))
    if by_name != d.sharded:
        from fusedit.errors import UserError

        saved = "under fsdp/hsdp" if by_name else "by one process or ddp"
        raise UserError(f"the checkpoint's optimizer state was saved {saved} and cannot resume under strategy "
                        f"'{d.strategy}': resume with a strategy of its kind, or start the stage afresh")
    if d.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def means(values: torch.Tensor, d: Dist) -> list[float]:
    """Scalars averaged over ranks, read back to the host in one go (for logging the global loss)."""
    t = values.detach().float().reshape(-1)
    if d.world > 1:
        t = t.to(d.device if d.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        t = t / d.world
    return t.cpu().tolist()


def rank_record(model: nn.Module, d: Dist, step: int, keys: list[str]) -> dict:
    """This rank's view of the distribution at `step` (cheap: shapes and names, no communication)."""
    rec = {"rank": d.rank, "host": d.host, "world": d.world, "strategy": d.strategy, "step": step,
           "sample_keys": list(keys), "mesh": None, "params": {}}
    first: dict[str, tuple[str, torch.Tensor]] = {}  # the first weight matrix of a block and of the root
    for name, p in unwrap(model).named_parameters():
        if name.startswith("dit.") and p.dim() >= 2:
            first.setdefault("block" if name.startswith("dit.blocks.") else "root", (name, p))
    for name, p in first.values():
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor under FSDP2/HSDP
        rec["params"][name] = {"full": list(p.shape), "local": list(local.shape),
                               "placements": [str(x) for x in getattr(p, "placements", ())]}
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            rec["mesh"] = {"shape": list(mesh.shape), "dims": list(mesh.mesh_dim_names or ())}
    return rec


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
