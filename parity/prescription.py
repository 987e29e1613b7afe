"""The fix, verified: the smallest change to the reference server's request that brings its render within the
thresholds of the preview, found by rendering candidates, each one something a person can set in a request.

The request (`requests.server_recipe`) already carries ai-toolkit's value wherever the server's schema has a place
for it, so what is left is the server's own behaviour (its CFG norm, resizes, LoRA method, dtype). A request can
still lean against it: the guidance scale (the server rescales the CFG result to the conditional's norm, which
weakens a strong guidance, so a higher scale gives part of it back) and the LoRA's network multiplier (another
LoRA method or dtype changes its strength). Candidates are tried from the smallest change up; the first that
passes is the fix, else the closest is shown with its distance and the words "does not pass".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .recipe import Recipe

# Recipe field -> the request field a person sets (ai-toolkit-inference's PromptItem / LoraItem), with the range the
# server's schema allows.
REQUEST_FIELDS = {"guidance": ("guidance_scale", 0.0, 20.0), "multiplier": ("network_multiplier", -2.0, 2.0)}
# Candidate factors on ai-toolkit's value, smallest change first.
FACTORS = {"guidance": (1.25, 1.5, 2.0, 0.75), "multiplier": (1.1, 1.25, 0.9)}


@dataclass
class Prescription:
    """What to change in the request (request field -> value), and the measured result of the changed request."""

    changes: dict[str, float] = field(default_factory=dict)
    distance: float | None = None  # the changed request's render vs the preview (the attribution metric)
    passes: bool = False
    renders: int = 0  # candidates rendered
    tried: list[tuple[dict, float]] = field(default_factory=list)

    def describe(self) -> str:
        if self.passes and not self.changes:
            return "the request as written passes the thresholds"
        change = ", ".join(f"{k} {v:g}" for k, v in self.changes.items()) or "no change"
        verdict = "passes the thresholds" if self.passes else "does not pass the thresholds (the closest found)"
        return f"{change}: {verdict}" + (f", distance {self.distance:.3g}" if self.distance is not None else "")


def candidates(server: Recipe) -> list[dict[str, float]]:
    """Recipe field changes to try, one field at a time, then both, smallest change first."""
    singles = []
    for name, factors in FACTORS.items():
        if name == "multiplier" and not server.lora:
            continue
        _, low, high = REQUEST_FIELDS[name]
        value = getattr(server, name)
        for f in factors:
            new = round(min(high, max(low, value * f)), 3)
            if new != value:
                singles.append({name: new})
    pairs = [{**g, **m} for g in singles if "guidance" in g for m in singles if "multiplier" in m][:2]
    return singles + pairs


def prescribe(render, distance, passes, server: Recipe) -> Prescription:
    """`render(recipe) -> image`, `distance(image) -> float` (to the preview), `passes(image) -> bool` (the
    thresholds). The request as written first; then each candidate until one passes."""
    image = render(server)
    out = Prescription(distance=distance(image), passes=passes(image), renders=1)
    if out.passes:
        return out
    best = (out.distance, {})
    for change in candidates(server):
        image = render(server.with_fields(**change))
        out.renders += 1
        d = distance(image)
        out.tried.append((change, d))
        if passes(image):
            out.changes, out.distance, out.passes = request_values(change), d, True
            return out
        best = min(best, (d, change), key=lambda b: b[0])
    out.distance, out.changes = best[0], request_values(best[1])
    return out


def request_values(change: dict[str, float]) -> dict[str, float]:
    """Recipe field changes as the request's field names."""
    return {REQUEST_FIELDS[k][0]: v for k, v in change.items()}
