"""A stop signal checkpoints every rank: SIGTERM (what schedulers, ``docker stop`` and a torchrun launcher that
is itself stopped send) and SIGINT (Ctrl-C; a terminal sends it to every process of the job) are caught as a
request, not as an exception, so no rank is torn out of a collective. After each optimizer step the ranks
agree (one all-reduce of the caught signal number over a CPU gloo group: no device synchronization), so a
signal to any one rank stops all of them after the same step, where they write one checkpoint together and
exit with 128 + the signal (SIGTERM wins over SIGINT when both arrive).

Once several ranks agree to stop, SIGTERM and SIGINT are ignored until the process exits (SIG_IGN: a Python
handler would be reset to the default during the interpreter's finalization). A launcher whose first worker has
exited (143 is not 0) sends SIGTERM to the others — torchrun at once, DeepSpeed's launcher within a second — and
that second signal killed a rank still closing its process group or finalizing (exit -15 instead of 143, three
runs in eight of tests/test_train_elastic.py's scenario). SIGKILL still ends a rank.
"""
from __future__ import annotations

import signal
import threading
from typing import Self

from . import distributed

CAUGHT = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT set ``stop.number`` instead of interrupting (main
    thread only: elsewhere Python cannot install handlers, and the defaults stay)."""

    def __init__(self):
        self.number = 0  # the largest signal caught here
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._catch) for number in CAUGHT}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _catch(self, number: int, frame) -> None:
        self.number = max(self.number, number)

    def agreed(self) -> int:
        """The signal every rank stops for now, 0 for none: the largest caught on any rank (all ranks call)."""
        agreed = distributed.max_over_ranks(self.number)
        if agreed and self.previous and distributed.active():  # several ranks stopping: no later signal may
            self.previous = {number: signal.SIG_IGN for number in self.previous}  # cut a checkpoint or exit short
            for number in self.previous:
                signal.signal(number, signal.SIG_IGN)
        return agreed
