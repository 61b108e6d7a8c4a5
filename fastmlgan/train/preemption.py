"""Stopping cleanly: SIGTERM (a scheduler's pre-emption, torchrun's shutdown) and SIGINT (Ctrl-C)
let the current step finish, then the trainer writes a checkpoint at that step and exits with the
conventional code (128 + the signal: 143, 130). A second Ctrl-C aborts at once.

Under torchrun every rank must stop after the same step, or the others would wait forever in the
next collective, and ranks may get the signal a step apart. So after every step each rank adds its
flags to an all-reduce (MAX) on a small gloo group of their own (CPU tensors: no device sync),
started after step k and read after step k+1: every rank sees the same answer after the same
step. Rank 0 also decides there when a time-based checkpoint (``--checkpoint.every_minutes``) is
due, since the ranks' clocks differ.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

STOP, CHECKPOINT = 0, 1


class StopRequested(Exception):
    """Raised by the trainer after it checkpointed at the step a signal asked it to stop at."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"the checkpoint at step {step} is {checkpoint}" if checkpoint else "checkpoints are off: nothing saved"
        super().__init__(f"{name}: stopped after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StoppedOutsideTraining(StopRequested):
    """SIGTERM/SIGINT before the training loop started or after it ended (``RunSignals``)."""

    def __init__(self, signum: int, message: str, step: int = 0, checkpoint: str | None = None) -> None:
        Exception.__init__(self, f"{signal.Signals(signum).name}: {message}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class RunSignals:
    """SIGTERM and SIGINT for the whole of the train command (``commands/train.py``): before the training loop (start-up,
    reading the data, building a cache) and after it (the last evaluation, writing the results)
    there is no step to finish, so the handler stops the process at once with one line saying what
    was and was not saved (``StoppedOutsideTraining``, exit 128 + the signal). While ``fit()`` runs,
    ``StopControl`` takes over the signals and gives them back afterwards."""

    def __init__(self) -> None:
        # What a stop now means: a function, so that it can name the checkpoint written last.
        self.describe = lambda: "stopped during start-up, before training began: nothing was trained"
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        raise StoppedOutsideTraining(signum, self.describe())

    def defer(self) -> None:
        """From now on a signal is only noted (``pending``): the run is ending and cleans up."""
        self.pending: int | None = None

        def note(signum: int, frame) -> None:
            self.pending = signum

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(signum, note)
                self._previous.setdefault(signum, previous)


class StopControl:
    """Signal flags and the ranks' agreement on them; ``poll()`` after every step."""

    def __init__(self, world_size: int = 1, every_minutes: float = 0.0, is_main: bool = True) -> None:
        self.signum: int | None = None
        self.every_s = every_minutes * 60.0
        self.is_main = is_main
        self._last_checkpoint = time.monotonic()
        self._previous: dict[int, object] = {}
        self._group = dist.new_group(backend="gloo") if world_size > 1 else None
        self._pending: tuple[object, torch.Tensor] | None = None

    # -- signals ----------------------------------------------------------------------------------

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread (a library user's worker thread: none)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self.uninstall()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        if self.is_main:
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
                  "(Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    # -- agreement --------------------------------------------------------------------------------

    def poll(self) -> tuple[int | None, bool]:
        """(the signal to stop for, or None; whether a time-based checkpoint is due), the same on
        every rank after the same step."""
        time_due = self.is_main and self.every_s > 0 and time.monotonic() - self._last_checkpoint >= self.every_s
        if self._group is None:
            return self.signum, time_due
        flags = torch.tensor([self.signum or 0, int(time_due)], dtype=torch.int64)
        agreed = None
        if self._pending is not None:
            work, tensor = self._pending
            work.wait()
            agreed = tensor
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        if agreed is None:
            return None, False
        signum = int(agreed[STOP])
        return (signum or None), bool(agreed[CHECKPOINT])

    def checkpointed(self) -> None:
        self._last_checkpoint = time.monotonic()

    def close(self) -> None:
        """Complete the last all-reduce (every rank has one in flight) and leave the signals."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        self.uninstall()
