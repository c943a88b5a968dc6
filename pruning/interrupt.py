"""Clean stops: Ctrl-C (SIGINT) and SIGTERM (what a cluster scheduler sends) end a run at a step boundary.

While :class:`StopSignals` is installed, the first SIGINT or SIGTERM only records the request; the
trainer finishes the step it is in, writes a checkpoint at that step (mid-epoch checkpoints resume
at the exact batch) and raises :class:`RunInterrupted`, whose one-line message says how to resume;
the command line prints it and exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM),
the shell convention for a process ended by that signal.  A second SIGINT of a single-process run
stops at once (``KeyboardInterrupt``, the last checkpoint intact); under ``torchrun`` repeated
signals are ignored (the launcher sends SIGTERM after a Ctrl-C, and the step must still finish).

In a data-parallel run the processes must stop at the *same* step: :meth:`StopSignals.agreed`
takes the largest request over all processes at every step (one small all-reduce on the CPU
group), so a signal that reached only some of them, or reached them at different moments, stops
all of them after the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from .distributed import DistContext, under_torchrun

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped cleanly on a signal; a checkpoint at the current step was written."""

    def __init__(self, signum: int, epoch: int, iteration: int, resume_hint: str) -> None:
        self.signum, self.epoch, self.iteration = int(signum), int(epoch), int(iteration)
        self.resume_hint = resume_hint
        super().__init__(f"interrupted at epoch {epoch}, iteration {iteration}; resume with: {resume_hint}")

    @property
    def exit_code(self) -> int:
        """``128 + signal number``: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class StopSignals:
    """Records SIGINT/SIGTERM while installed (a context manager; only in the main thread, else inert)."""

    def __init__(self) -> None:
        self.requested = 0  # the first signal's number, 0 = none
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.requested = 0
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal handler signature
        if not self.requested:
            self.requested = signum
        elif signum == signal.SIGINT and not under_torchrun():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def agreed(self, ctx: DistContext) -> int:
        """The signal every process stops on after this step (0: go on); the same answer on every process."""
        return ctx.any_flag(self.requested)


__all__ = ["SIGNALS", "RunInterrupted", "StopSignals"]
