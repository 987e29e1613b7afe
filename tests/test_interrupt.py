"""Where a SIGTERM becomes KeyboardInterrupt: at once inside a check or outside any loop, else before the next check."""

from __future__ import annotations

import signal

import pytest

from parity.interrupt import Interrupt


def test_outside_a_loop_a_signal_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt):
        Interrupt().handle(signal.SIGTERM, None)


def test_between_checks_a_signal_waits_for_the_next_check():
    stop = Interrupt()
    done = []
    with pytest.raises(KeyboardInterrupt), stop.loop():
        for i in range(3):
            with stop.check():
                done.append(i)
            if i == 0:
                stop.handle(signal.SIGTERM, None)  # e.g. while pytest prints the first test's report
                assert stop.pending
    assert done == [0]
    assert not stop.polled


def test_inside_a_check_a_signal_interrupts_at_once():
    stop = Interrupt()
    with stop.loop(), pytest.raises(KeyboardInterrupt):
        with stop.check():
            stop.handle(signal.SIGTERM, None)
    assert not stop.checking
