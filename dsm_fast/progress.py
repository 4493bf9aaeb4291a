"""The live progress line of ``train``: a smoothed loss, img/s and the ETA, redrawn about twice a second.

The smoothed loss is an exponential moving average kept on the device,

    L̄_k = β L̄_{k−1} + (1 − β) L_k,   β = 1 − 1/window,   L̄_1 = L_1,

over the steps that were not skipped (the step's ``ok`` flag, a device tensor, selects), so a step adds a few device
operations and no host synchronization; the average is read (one sync) only when the line is redrawn.

The logged rows, one every ``log_every`` steps, go to RUN/stats.jsonl and TensorBoard (:class:`StatsLog`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class Progress:
    """A tqdm bar over steps with ``loss`` (smoothed), ``img/s`` and tqdm's own ETA in its postfix."""

    def __init__(self, total: int, initial: int, batch_size: int, enabled: bool, window: int = 25,
                 interval: float = 0.5):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self.batch_size, self.beta, self.interval = batch_size, 1.0 - 1.0 / window, interval
        self.count = initial  # steps done (tqdm counts nothing when disabled)
        self.average: torch.Tensor | None = None  # L̄ on the device
        self.seen: torch.Tensor | None = None  # how many steps L̄ holds, on the device
        self.first: float | None = None  # L̄ when it was first read at a logged step
        self.drawn = {"time": time.perf_counter(), "step": initial}

    def step(self, terms: dict[str, torch.Tensor]) -> None:
        """Count one step; ``terms`` holds its batch-mean 'loss' and, optionally, 'ok' (false: the step was skipped
        and its loss is left out), both on the device."""
        loss = terms["loss"].detach().float()
        ok = terms.get("ok", torch.ones((), dtype=torch.bool, device=loss.device))
        if self.average is None:
            self.average, self.seen = torch.zeros_like(loss), torch.zeros((), dtype=torch.long, device=loss.device)
        folded = torch.where(self.seen > 0, self.average.lerp(loss, 1.0 - self.beta), loss)
        self.average = torch.where(ok, folded, self.average)
        self.seen = self.seen + ok.long()
        self.count += 1
        self.bar.update(1)
        now = time.perf_counter()
        if not self.bar.disable and now - self.drawn["time"] >= self.interval:
            self.redraw(now)

    def redraw(self, now: float) -> None:
        steps = self.count - self.drawn["step"]
        postfix = {"img/s": f"{steps * self.batch_size / max(now - self.drawn['time'], 1e-9):.0f}"}
        loss = self.smoothed()
        if not math.isnan(loss):  # some step was folded in
            postfix = {"loss": f"{loss:.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=True)
        self.drawn.update(time=now, step=self.count)

    def smoothed(self) -> float:
        """L̄ now (a host synchronization); NaN before the first step that was not skipped."""
        return float("nan") if self.seen is None or int(self.seen) == 0 else float(self.average)

    def mark_logged(self) -> None:
        """Called at each logged step (which synchronizes anyway): remembers the first L̄ read there."""
        if self.first is None and not math.isnan(loss := self.smoothed()):
            self.first = loss

    def close(self) -> None:
        self.bar.close()


class StatsLog:
    """The logged rows: one per ``log_every`` steps, with img/s since the previous row, into RUN/stats.jsonl and
    TensorBoard (RUN/tb) on rank 0; other ranks only compute the row."""

    def __init__(self, run_dir: Path, step: int, batch_size: int, enabled: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=step) if enabled else None
        self.file = (run_dir / "stats.jsonl").open("a") if enabled else None
        self.batch_size, self.last_time, self.last_step = batch_size, time.perf_counter(), step

    def write(self, step: int, terms: dict[str, torch.Tensor], **extra) -> dict:
        now = time.perf_counter()
        record = {k: float(v) for k, v in terms.items()}
        record.update(step=step, img_per_s=(step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9),
                      **extra)
        self.last_time, self.last_step = now, step
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, step)
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()
