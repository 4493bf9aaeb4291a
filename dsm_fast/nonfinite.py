"""The bookkeeping of non-finite (skipped) steps: what is counted on the device, what is read at log time, and
which step is trusted.

A step whose loss or gradient is non-finite is skipped (the engine drops the update). The trainer never waits for
the device to learn that: three counters are updated in place on the device after every step (so a captured CUDA
graph replays them too) and read on the host only every ``log_every``/``checkpoint_every`` steps:

    in_row   non-finite steps in a row up to now,
    total    non-finite steps so far,
    longest  the longest run of consecutive non-finite steps since the last read.

Only non-finite losses are seen, not the update that caused them: a run of bad steps that began at step b
distrusts state b too (the last finite update produced it). Between two reads a run may begin and end unseen, so
the first distrusted step is bounded by ``trusted_until``, the step − in_row of the previous read."""
from __future__ import annotations

import torch


class NonFiniteSteps:
    """The three device counters of non-finite steps, their reads at log time, and the steps they distrust."""

    def __init__(self, device: torch.device | str, max_in_row: int):
        self.counts = torch.zeros(3, dtype=torch.long, device=device)  # in_row, total, longest since the last read
        self.max_in_row = max_in_row
        self.trusted_until = 0  # step − in_row at the last read: no run of bad steps unseen so far began before it

    def update(self, ok: torch.Tensor) -> None:
        """After a step (on the device, no synchronization): ``ok`` is false when the step was skipped."""
        bad = (~ok).long()
        in_row = (self.counts[0] + 1) * bad
        self.counts.copy_(torch.stack([in_row, self.counts[1] + bad, torch.maximum(self.counts[2], in_row)]))

    @property
    def in_row(self) -> int:
        """Non-finite steps in a row up to now (a read of the device: a synchronization)."""
        return int(self.counts[0])

    @property
    def total(self) -> int:
        """Non-finite steps so far (a read of the device: a synchronization)."""
        return int(self.counts[1])

    def read(self, step: int) -> str | None:
        """At a log or checkpoint step: why the run must stop (``max_in_row`` non-finite losses in a row since the
        last read), or None, after which the steps before step − in_row are trusted."""
        longest = int(self.counts[2])
        self.counts[2] = self.counts[0]
        if longest >= self.max_in_row:
            return f"{longest} non-finite losses in a row at step {step}"
        self.trusted_until = step - self.in_row
        return None

    def first_distrusted(self, step: int) -> int:
        """The first step whose state a divergence found at ``step`` distrusts: where the current run of bad steps
        began, or, when a run ended unseen since the last read, no later than ``trusted_until``."""
        return min(step - self.in_row, self.trusted_until)

    def trusted_before(self, step: int) -> int:
        """Checkpoints before this step may be trusted now: the start of the current run of bad steps, else all."""
        in_row = self.in_row
        return step - in_row if in_row else step + 1

    def state_dict(self) -> dict[str, int]:
        return {"bad_total": self.total, "bad_in_row": self.in_row}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters of a checkpoint's ``state`` (which holds its ``step``)."""
        total, in_row = int(state["bad_total"]), int(state.get("bad_in_row", 0))
        self.counts.copy_(torch.tensor([in_row, total, in_row]))
        self.trusted_until = int(state["step"]) - in_row
