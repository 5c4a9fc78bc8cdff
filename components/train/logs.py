"""loss.tsv (for dvc plots) and TensorBoard events of a stage; rank 0 writes them. Every rank writes its
own `ranks/rank-<r>.json` (what distribution meant for it; see components/train/distributed.py).

Losses stay on the device until `settle`: reading one back to the host every step would stall the
GPU's queue once per step, so they are read in one go every `log_every` steps and before each save.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from fusedit.components.shared import storage
from fusedit.components.train import distributed


class TrainLogs:
    def __init__(self, output: str, stage: str, start: int, d: distributed.Dist):
        self.remote = output if storage.is_s3(output) else None
        self.root = Path(".fusedit-logs") / stage if self.remote else Path(output)
        self.stage, self.d, self.enabled = stage, d, d.main
        self.rows: list[tuple] = []
        self.rates: list[tuple[int, float]] = []  # (step, images/s so far) of this run: timing.tsv, untracked
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []  # step, loss, lr, images/s
        self.last_loss = float("nan")
        self.tb = None
        if self.enabled:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.remote and storage.exists(storage.join(self.remote, "loss.tsv")):  # resuming on a new pod
                (self.root / "loss.tsv").write_bytes(storage.read_bytes(storage.join(self.remote, "loss.tsv")))
            self.rows = resume_rows(self.root / "loss.tsv", start)
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.root / "tensorboard"), purge_step=start + 1)
        self.t0, self.seen = time.perf_counter(), 0

    def step(self, step: int, loss: torch.Tensor, lr: float, samples: int) -> None:
        """Record a finished step; its loss is read back later, in `settle`."""
        self.seen += samples
        self.pending.append((step, loss.detach().float().reshape(()), lr, self.images_per_s))

    def settle(self) -> float:
        """Read the pending losses back (one device sync, one all-reduce) and log them; the last one.

        A non-finite loss stops the stage here, before any checkpoint could hold its weights."""
        if not self.pending:
            return self.last_loss
        steps, losses, lrs, ipss = zip(*self.pending, strict=True)
        self.pending = []
        values = distributed.means(torch.stack(losses), self.d)
        for step, loss, lr, ips in zip(steps, values, lrs, ipss, strict=True):
            if not math.isfinite(loss):
                raise RuntimeError(f"stage '{self.stage}': loss is {loss} at step {step}")
            if self.enabled:  # throughput goes to TensorBoard only: loss.tsv is DVC-tracked, so deterministic
                self.rows.append((step, loss, lr))
                self.rates.append((step, ips))
                self.tb.add_scalar("train/loss", loss, step)
                self.tb.add_scalar("train/lr", lr, step)
                self.tb.add_scalar("train/images_per_s", ips, step)
        self.last_loss = values[-1]
        return self.last_loss

    @property
    def images_per_s(self) -> float:
        """Samples of every rank per second since the stage (or its resumption) started."""
        return self.seen * self.d.world / max(time.perf_counter() - self.t0, 1e-9)

    def flush(self) -> None:
        """Write loss.tsv (and upload it); every rank must `settle` first (it may all-reduce)."""
        if self.enabled:
            _write_rows(self.root / "loss.tsv", self.rows)
            (self.root / "timing.tsv").write_text("step\timages_per_s\n" + "".join(
                f"{st}\t{ips:.2f}\n" for st, ips in self.rates))
            self.tb.flush()
            if self.remote:
                storage.write_bytes(storage.join(self.remote, "loss.tsv"), (self.root / "loss.tsv").read_bytes())

    def rank(self, record: dict) -> None:
        """This rank's `distributed.rank_record`, beside the outputs (S3 too): `ranks/rank-<r>.json`."""
        r = record["host"] if self.d.strategy == "spmd" else record["rank"]
        storage.write_json(storage.join(self.remote or str(self.root), "ranks", f"rank-{r}.json"), record)

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self.tb.close()


def resume_rows(path: Path, start: int) -> list[tuple]:
    """Loss rows up to the resumed step (later ones belonged to the interrupted, unsaved tail)."""
    if not path.is_file():
        return []
    rows = [ln.split("\t") for ln in path.read_text().splitlines()[1:] if ln.strip()]
    return [(int(r[0]), float(r[1]), float(r[2])) for r in rows if int(r[0]) <= start]


def _write_rows(path: Path, rows: list[tuple]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("step\tloss\tlr\n" + "".join(f"{s}\t{lo:.6f}\t{lr:.3g}\n" for s, lo, lr in rows))
    os.replace(tmp, path)
