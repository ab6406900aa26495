"""Preemption: SIGUSR2 (SLURM's warning before preemption or timeout) and SIGTERM become a flag that the loop
reads at step boundaries, where it saves a checkpoint and requeues or exits."""

from __future__ import annotations

import os
import signal
import sys
import threading


class PreemptionFlag:
    """Turns SIGUSR2 and SIGTERM into a flag read at step boundaries, where the loop saves a checkpoint and leaves.

    SIGUSR2 is SLURM's warning before preemption or timeout: once the checkpoint is on disk the previous
    handler (submitit's, which requeues the job) is called. SIGTERM (`kill`, `scancel`, torchrun stopping
    its workers) exits with status 143 after the checkpoint. A second SIGTERM stops at once, as it would
    have without this handler, for a run that is busy in a long evaluation.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR2", "SIGTERM") if hasattr(signal, name))

    def __init__(self):
        self.received: list[int] = []
        self.sampling = False  # set by the trainer while it samples an FID: a stop comes after the current batch
        self.previous: dict[int, object] = {}
        if _in_main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    @property
    def raised(self) -> bool:
        return bool(self.received)

    @property
    def requeues(self) -> bool:
        """Whether this stop is a preemption to requeue (SIGUSR2) rather than a stop (SIGTERM, or a peer's)."""
        return getattr(signal, "SIGUSR2", None) in self.received

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and signum in self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received.append(signum)
        if signum == signal.SIGTERM:  # os.write: print() may be mid-write on the same stream
            where = b"after this sampling batch" if self.sampling else b"at the end of this step"
            os.write(2, b"SIGTERM: stopping " + where + b" with a checkpoint (again to stop now)\n")

    def requeue_or_exit(self, requeue: bool | None = None) -> None:
        """Requeue (SIGUSR2) or exit 143; `requeue` is the job's decision where the ranks saw different signals."""
        requeue = self.requeues if requeue is None else requeue
        previous = self.previous.get(getattr(signal, "SIGUSR2", None))
        if requeue and callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
            previous(signal.SIGUSR2, None)  # submitit: checkpoint() -> requeue -> exit
        sys.exit(0 if requeue else 128 + signal.SIGTERM)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
