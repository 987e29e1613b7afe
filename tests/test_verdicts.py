"""The pure verdict rules."""

from __future__ import annotations

from parity.verdicts import fidelity_verdict


def test_within_the_floor_is_reproduced():
    assert fidelity_verdict(0.6, 54.0, 3.0, "cuda:0", "cpu") == (True, "reproduced")


def test_far_closer_than_the_reference_is_cross_device_drift_naming_both_devices():
    ok, words = fidelity_verdict(9.0, 60.0, 3.0, "cuda:0 (the config's device)", "cpu (Intel Xeon)")
    assert ok and words.startswith("reproduced within cross-device drift, 9.0 levels")
    assert "cuda:0 (the config's device)" in words and "cpu (Intel Xeon)" in words


def test_not_much_closer_than_the_reference_blames_an_input():
    assert fidelity_verdict(30.0, 40.0, 3.0, "cuda", "cpu") == (False, "cannot reproduce preview")
    assert fidelity_verdict(5.0, None, 3.0, "cuda", "cpu") == (False, "cannot reproduce preview")
