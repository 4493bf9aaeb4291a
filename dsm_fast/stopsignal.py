"""A stop signal checkpoints every rank: SIGTERM (what schedulers, ``docker stop`` and a torchrun launcher that
is itself stopped send) and SIGINT (Ctrl-C; a terminal sends it to every process of the job) are caught as a
request, not as an exception, so no rank is torn out of a collective. After each optimizer step the ranks
agree (one all-reduce of the caught signal number over a CPU gloo group: no device synchronization), so a
signal to any one rank stops all of them after the same step, where they write one checkpoint together and
exit with 128 + the signal (SIGTERM wins over SIGINT when both arrive).
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
        self.number = 0
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
        return distributed.max_over_ranks(self.number)
