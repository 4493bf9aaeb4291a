"""The live progress line of ``train``: a smoothed loss, img/s and the ETA, redrawn about twice a second.

The smoothed loss is an exponential moving average kept on the device,

    L̄_k = β L̄_{k−1} + (1 − β) L_k,   β = 1 − 1/window,   L̄_1 = L_1,

so a step adds one device operation and no host synchronization; the average is read (one sync) only when the
line is redrawn. The logged rows (stats.jsonl, TensorBoard) are written elsewhere and are not touched here.
"""
from __future__ import annotations

import time

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
        self.first: float | None = None  # L̄ when it was first read at a logged step
        self.drawn = {"time": time.perf_counter(), "step": initial}

    def step(self, terms: dict[str, torch.Tensor] | None) -> None:
        """Count one step; ``terms`` (None for a skipped step) holds its batch-mean 'loss' on the device."""
        if terms is not None:
            loss = terms["loss"].detach().float()
            self.average = loss.clone() if self.average is None else self.average.lerp_(loss, 1.0 - self.beta)
        self.count += 1
        self.bar.update(1)
        now = time.perf_counter()
        if not self.bar.disable and now - self.drawn["time"] >= self.interval:
            self.redraw(now)

    def redraw(self, now: float) -> None:
        steps = self.count - self.drawn["step"]
        postfix = {"img/s": f"{steps * self.batch_size / max(now - self.drawn['time'], 1e-9):.0f}"}
        if self.average is not None:
            postfix = {"loss": f"{self.smoothed():.4f}", **postfix}
        self.bar.set_postfix(postfix, refresh=True)
        self.drawn.update(time=now, step=self.count)

    def smoothed(self) -> float:
        """L̄ now (a host synchronization); NaN before the first finite step."""
        return float("nan") if self.average is None else float(self.average)

    def mark_logged(self) -> None:
        """Called at each logged step (which synchronizes anyway): remembers the first L̄ read there."""
        if self.first is None and self.average is not None:
            self.first = self.smoothed()

    def close(self) -> None:
        self.bar.close()
