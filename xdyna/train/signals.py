"""The preemption signal flag: records that SIGUSR1/SIGUSR2/SIGTERM arrived, and nothing else.

Kept free of heavy imports so ``xdyna-train`` can install it as its first act, seconds before
torch and Lightning are imported: from then on a preemption signal (SLURM's ``--signal``
lead, or the SIGUSR2 hydra-submitit-launcher asks for) can no longer kill the job or reach
submitit's own requeue handler; :class:`xdyna.train.preemption.PreemptionHandler` acts on it at
the next step end.
"""

from __future__ import annotations

import signal
from typing import Any, Iterable

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")


class PreemptionSignals:
    """Catches ``names`` and remembers the first one received (``received``)."""

    def __init__(self, names: Iterable[str | int] = DEFAULT_SIGNALS):
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in names]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    # Signal handlers run between bytecodes of the main thread: keep them to setting a flag.
    def _on_signal(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        """(Re)install the handler; the handlers found the first time are what ``restore`` puts back.

        Installing again is how the flag takes a signal back from Lightning, which registers its
        own SIGTERM handler when ``fit`` starts."""
        for sig in self.signals:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None
