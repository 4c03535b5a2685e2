"""The preemption signal flag: records that SIGUSR1/SIGUSR2/SIGTERM (or a Ctrl-C) arrived, and nothing else.

Kept free of heavy imports so ``xdyna-train`` can install it as its first act, seconds before
torch and Lightning are imported: from then on a preemption signal (SLURM's ``--signal``
lead, or the SIGUSR2 hydra-submitit-launcher asks for) can no longer kill the job or reach
submitit's own requeue handler; :class:`xdyna.train.preemption.PreemptionHandler` acts on it at
the next step end.

SIGINT (Ctrl-C) is the user's stop, not a preemption: while steps run it is deferred the same way
(the finished step is saved, then the run stops without a requeue); before training has started
(nothing to save yet) and at a second Ctrl-C it interrupts at once, as Python's default does.
"""

from __future__ import annotations

import signal
from typing import Any, Iterable

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
INTERRUPT = signal.SIGINT


class PreemptionSignals:
    """Catches ``names`` and remembers the first one received (``received``).

    ``interrupt``: also catch SIGINT, deferred only while ``deferring_interrupt`` is set (the
    training loop sets it when the first step starts)."""

    def __init__(self, names: Iterable[str | int] = DEFAULT_SIGNALS, interrupt: bool = False):
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in names]
        self.interrupt = interrupt
        self.deferring_interrupt = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    # Signal handlers run between bytecodes of the main thread: keep them to setting a flag.
    def _on_signal(self, signum, _frame) -> None:
        if signum == INTERRUPT and (not self.deferring_interrupt or self.received == INTERRUPT):
            raise KeyboardInterrupt  # nothing to save yet, or the second Ctrl-C: stop now
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        """(Re)install the handler; the handlers found the first time are what ``restore`` puts back.

        Installing again is how the flag takes a signal back from Lightning, which registers its
        own SIGTERM handler when ``fit`` starts."""
        for sig in self.signals + ([INTERRUPT] if self.interrupt else []):
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    @property
    def interrupted(self) -> bool:
        """Whether the flag holds the user's Ctrl-C (stop without requeue) rather than a preemption."""
        return self.received == INTERRUPT
