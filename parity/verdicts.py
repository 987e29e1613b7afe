"""Pure verdict rules: which thresholds a comparison misses, and whether the training recipe reproduces the
preview. No rendering here: the checker measures, these functions decide."""

from __future__ import annotations

from . import compare as cmp

# The training render must be at most this share of the reference render's distance from the preview to be
# "far closer": a missing input (LoRA step, seed, checkpoint, control image) moves both renders alike, while
# another device kind or bf16 kernel moves only the bits, so the training render stays much closer.
DRIFT_SHARE = 0.25


def judge(c: cmp.Comparison, thresholds: dict) -> list[str]:
    """The thresholds a comparison misses, as readable strings (empty: it passes)."""
    failed = []
    checks = {"ssim_min": (c.ssim, lambda v, t: v >= t, ">="), "psnr_min": (c.psnr, lambda v, t: v >= t, ">="),
              "mean_abs_max": (c.mean_abs, lambda v, t: v <= t, "<="),
              "max_abs_max": (c.max_abs, lambda v, t: v <= t, "<=")}
    for key, limit in thresholds.items():
        value, ok, op = checks[key]
        if value is not None and not ok(value, limit):
            failed.append(f"{key.rsplit('_', 1)[0]} {value:.4g} not {op} {limit:g}")
    return failed


def passes(preview, image, encode, thresholds: dict) -> bool:
    """`image`, encoded as the preview was (`encode`), is the preview's size and meets every threshold."""
    c = cmp.compare(preview, encode(image))
    return c.same_size and not judge(c, thresholds)


def fidelity_verdict(training_mean: float | None, reference_mean: float | None, floor: float, recorded_on: str,
                     here: str) -> tuple[bool, str]:
    """(reproduced, the verdict's words) for the training render's mean distance from the preview (0-255 levels).

    Within the kernel floor: reproduced. Outside it but far closer than the reference render: reproduced within
    cross-device drift (the preview came from another device kind or kernel), named with both devices. Otherwise
    the training recipe does not reproduce the preview: an input is missing or different."""
    if training_mean is not None and training_mean <= floor:
        return True, "reproduced"
    if training_mean is not None and reference_mean is not None and training_mean <= DRIFT_SHARE * reference_mean:
        return True, (f"reproduced within cross-device drift, {training_mean:.1f} levels (preview made on "
                      f"{recorded_on}, rendered here on {here}; the reference render is {reference_mean:.1f} away)")
    return False, "cannot reproduce preview"


def explained_by_set(outcome: dict, closing, accepted: tuple[str, ...]) -> dict:
    """A mismatch whose closing set (attribution.ClosingSet) closes the gap with accepted fields only is
    `explained`: `accept:` applies to the set of fields that explains the gap, not to each field alone."""
    if not closing.closed or not closing.fields or not set(closing.fields) <= set(accepted):
        return outcome
    return dict(verdict="explained", reason=f"gap closed by accepted fields ({closing.path()}); " + outcome["reason"])
