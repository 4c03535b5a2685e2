"""The preemption flag: catches the signals, remembers the first, gives the old handlers back."""

from __future__ import annotations

import os
import signal

from xdyna.train.signals import PreemptionSignals


def test_flag_records_first_signal_instead_of_dying_and_restores_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        flag = PreemptionSignals(("SIGUSR1", "SIGUSR2"))
        flag.install()
        flag.install()  # re-installing (taking a signal back from Lightning) keeps the first previous
        os.kill(os.getpid(), signal.SIGUSR1)   # default action would terminate the process
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.received == signal.SIGUSR1 and flag.name == "SIGUSR1"
        assert seen == []
        flag.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, previous)
