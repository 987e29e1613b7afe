"""Attribution: which recipe difference explains the gap, measured by counterfactual renders (DESIGN section 7).

Start from the reference recipe; switch one finding (or a group of fields that only make sense together) to
its training value, render, and measure against the preview; then all training values together (the fidelity
render). A field's share is the part of the gap (reference distance minus training distance) its switch closes.
The opposite direction, the training recipe with one reference value switched in, answers "what would I have
to change at inference to get my preview back". Renders go through the runner's cache, so each costs once.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from PIL import Image

from . import compare as cmp
from .recipe import Recipe, differing_fields, switch
from .render import NotRenderable

# Fields that are switched together: which control images, and how they are resized, only make sense as one.
GROUPS = (("control_images", "control_prompt_resize", "control_vae_resize"), ("width", "height"),
          ("cfg_norm", "cfg_form"))  # a CFG norm means the form's own: Diffusers' rescale (v), ComfyUI's CFGNorm (x0)
# Differences that are not a rendering choice, or that this machine cannot render.
NOT_RENDERED = {
    "output_format": "the preview's encoding: every render is compared encoded as the preview was",
    "device": "needs the other device; compare on that device (noise floor across devices)",
    "model": "another checkpoint or pipeline: each side renders on its own",
}


@dataclass
class Cause:
    fields: tuple[str, ...]
    distance: float | None = None  # reference recipe with these fields at the training value, vs preview
    share: float | None = None  # part of the gap closed
    reverse_distance: float | None = None  # training recipe with these fields at the reference value
    testable: bool = True
    reason: str = ""

    @property
    def name(self) -> str:
        return "+".join(self.fields)


@dataclass
class Step:
    """One step of the closing set: the cause added, and where the set stands with it switched."""

    cause: Cause
    distance: float  # the reference recipe with every cause so far at the training value, vs preview
    share: float  # cumulative part of the gap closed
    marginal: float  # what this step closed of the gap, after the causes before it


@dataclass
class ClosingSet:
    """The causes that, switched together, close the gap (greedy: each step adds the cause that closes the most of
    what is left); `closed` says whether it reached the thresholds or the training render's floor."""

    steps: list[Step] = field(default_factory=list)
    closed: bool = False
    renders: int = 0  # renders this search made beyond the single switches
    why_not: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for s in self.steps for f in s.cause.fields)

    @property
    def share(self) -> float | None:
        return self.steps[-1].share if self.steps else None

    def path(self) -> str:
        """`cfg_norm 0.67 > precision 0.93 > dtype 1.00` (and what stopped it when it does not close)."""
        text = " > ".join(f"{s.cause.name} {s.share:.2f}" for s in self.steps)
        return text if self.closed else f"{text} (not closed: {self.why_not})".lstrip()

    def interactions(self, limit: float) -> list[str]:
        """Causes whose share alone and after the causes before them differ by more than `limit` (a share)."""
        return [f"{s.cause.name} alone {s.cause.share:.2f}, after {' + '.join(t.cause.name for t in self.steps[:i])} "
                f"{s.marginal:.2f}" for i, s in enumerate(self.steps)
                if i and s.cause.share is not None and abs(s.cause.share - s.marginal) > limit]


@dataclass
class Attribution:
    metric: str
    reference_distance: float
    training_distance: float
    causes: list[Cause] = field(default_factory=list)
    floor: float = 0.0
    closing: ClosingSet | None = None

    @property
    def gap(self) -> float:
        return self.reference_distance - self.training_distance

    @property
    def explained(self) -> float:
        return sum(c.share for c in self.causes if c.share is not None)

    @property
    def interaction(self) -> float:
        """Shares adding up to more (or less) than 1: the switches interact."""
        return self.explained - 1.0

    @property
    def top(self) -> Cause | None:
        ranked = [c for c in self.causes if c.share is not None]
        return max(ranked, key=lambda c: c.share) if ranked and self.gap > self.floor else None

    def as_columns(self) -> dict[str, object]:
        top = self.top
        finite = lambda v: v if v is None or math.isfinite(v) else None  # noqa: E731  (JSON has no inf)
        causes = [{**asdict(c), "distance": finite(c.distance), "reverse_distance": finite(c.reverse_distance)}
                  for c in self.causes]
        closing = self.closing
        steps = [{"cause": st.cause.name, "distance": finite(st.distance), "share": st.share,
                  "marginal": st.marginal} for st in closing.steps] if closing else []
        return {"top_cause": top.name if top else "", "top_cause_share": round(top.share, 4) if top else None,
                "closing_set": closing.path() if closing else "",
                "closing_share": round(closing.share, 4) if closing and closing.share is not None else None,
                "interactions": "; ".join(closing.interactions(self.interaction_limit)) if closing else "",
                "causes": json.dumps({"metric": self.metric, "gap": finite(self.gap), "floor": self.floor,
                                      "reference_distance": finite(self.reference_distance),
                                      "training_distance": finite(self.training_distance), "causes": causes,
                                      "closing_set": steps, "closed": closing.closed if closing else None,
                                      "closing_renders": closing.renders if closing else 0})}

    @property
    def interaction_limit(self) -> float:
        """How far a share alone and after others may differ before the report calls it an interaction: the floor
        as a share of the gap, and never under 5 % (rendering noise)."""
        return max(0.05, self.floor / self.gap if self.gap > 0 and math.isfinite(self.gap) else 0.0)


def encoder(fmt: str):
    """Save-and-reload as a preview of `fmt` was saved (identity for lossless previews)."""
    return (lambda image: image) if fmt == "png" else (lambda image: cmp.encode_like(image, fmt))


def distance(preview: Image.Image, image: Image.Image, encode, metric: str) -> float:
    """How far a render is from the preview, encoded as the preview was (`encode`; lower is closer)."""
    c = cmp.compare(preview, encode(image), ssim=metric == "ssim")
    if not c.same_size:
        return float("inf")
    if metric == "ssim":
        return 1.0 - c.ssim
    return {"mean_abs": c.mean_abs, "max_abs": float(c.max_abs), "psnr": -c.psnr}[metric]


def cause_groups(fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    out, used = [], set()
    for group in GROUPS:
        present = tuple(f for f in group if f in fields)
        if present:
            out.append(present)
            used.update(present)
    out += [(f,) for f in fields if f not in used]
    return out


def planned_causes(training: Recipe, reference: Recipe, only: tuple[str, ...] | None = None,
                   only_reason: str = "") -> list[Cause]:
    """One cause per group of differing fields, marked untestable where it is not rendered (and why)."""
    causes = []
    for group in cause_groups(differing_fields(training, reference)):
        cause = Cause(group)
        blocked = [NOT_RENDERED[f] for f in group if f in NOT_RENDERED]
        if blocked:
            cause.testable, cause.reason = False, "; ".join(blocked)
        elif only is not None and not set(group) & set(only):
            cause.testable, cause.reason = False, only_reason or "not rendered"
        causes.append(cause)
    return causes


def counterfactuals(training: Recipe, reference: Recipe, only: tuple[str, ...] | None = None,
                    reverse: bool = False) -> list[Recipe]:
    """The recipes `attribute` renders besides the two sides, so a caller can make them grouped by pipeline."""
    out = []
    for cause in planned_causes(training, reference, only):
        if cause.testable:
            out.append(switch(reference, training, cause.fields))
            if reverse:
                out.append(switch(training, reference, cause.fields))
    return out


def attribute(render, preview: Image.Image, training: Recipe, reference: Recipe, *, metric: str = "mean_abs",
              floor: float = 0.0, reverse: bool = False, encode=None, only: tuple[str, ...] | None = None,
              only_reason: str = "", passes=None, prepare=None) -> Attribution:
    """`render(recipe) -> Image` (cached by the caller); `encode`: how the preview file was saved (default: as
    the training recipe's output format says). Returns the ranking of causes. With `only`, a cause none of whose
    fields is in it is listed but not rendered (`only_reason` says why). With `passes(image) -> bool` (the
    thresholds against the preview) and a reference that fails them, also the closing set (`closing_set`);
    `prepare(recipes)`, when given, is told each step's renders first (the caller makes them grouped by pipeline)."""
    encode = encode or encoder(training.output_format)
    dist = lambda recipe: distance(preview, render(recipe), encode, metric)  # noqa: E731
    result = Attribution(metric, dist(reference), dist(training), floor=floor)
    for cause in planned_causes(training, reference, only, only_reason):
        if cause.testable:
            try:
                cause.distance = dist(switch(reference, training, cause.fields))
                if reverse:
                    cause.reverse_distance = dist(switch(training, reference, cause.fields))
            except NotRenderable as exc:  # e.g. a quantized base without its library
                cause.testable, cause.reason = False, f"not testable here: {exc}"
        if cause.distance is not None and result.gap > floor:
            if math.isinf(result.gap):  # sizes differ: the switch that makes them match closes it all
                cause.share = 1.0 if math.isfinite(cause.distance) else 0.0
            else:
                cause.share = (result.reference_distance - cause.distance) / result.gap
        result.causes.append(cause)
    result.causes.sort(key=lambda c: -(c.share if c.share is not None else float("-inf")))
    if passes is not None and result.gap > floor and not passes(render(reference)):
        result.closing = closing_set(render, dist, passes, result, reference, training, prepare)
    return result


PAIR_POOL = 6  # the causes (closest alone first) whose pairs the closing set tries when no single one helps


def _best_pair(tried, chosen: tuple[str, ...], dist_of, out: "ClosingSet", prepare, reference, training):
    """The pair of causes (among the PAIR_POOL closest alone) whose switch together, with `chosen`, comes closest:
    (a Cause of both, its distance), or None with fewer than two. Interactions such as CFG strength and a CFG norm,
    or a vision image and its token order, only close together."""
    pool = [c for c, _ in sorted(tried, key=lambda cd: cd[1])[:PAIR_POOL]]
    pairs = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1:]]
    if not pairs:
        return None
    if prepare is not None:
        prepare([switch(reference, training, chosen + a.fields + b.fields) for a, b in pairs])
    scored = [(Cause(a.fields + b.fields), dist_of(chosen + a.fields + b.fields)) for a, b in pairs]
    out.renders += len(scored)
    return min(scored, key=lambda cd: cd[1])


def closing_set(render, dist, passes, result: Attribution, reference: Recipe, training: Recipe,
                prepare=None) -> ClosingSet:
    """Grow a set of causes greedily: add the one whose switch, with those already chosen, closes the most of what
    is left (at least the floor, and 1 % of the gap: less is rendering noise); when no single cause helps, the best
    pair of them (they may act only together); stop when the switched reference comes within the floor of the
    training render, or when neither helps. The set is `closed` when it got there or its switched reference passes
    the thresholds. Step one is the single switches already made."""
    out = ClosingSet()
    left = [c for c in result.causes if c.distance is not None]
    current, chosen = result.reference_distance, ()
    target = result.training_distance + result.floor
    least = max(result.floor, 0.01 * result.gap) if math.isfinite(result.gap) else result.floor
    untested = [c.name for c in result.causes if c.distance is None]
    rest = (f"the rest needs a field not rendered here ({', '.join(untested)}), a missing input, or a difference "
            f"the recipes do not model" if untested else
            "the rest is a missing input or a difference the recipes do not model")
    pairs_left = 2
    while left and current > target:
        if chosen and prepare is not None:
            prepare([switch(reference, training, chosen + c.fields) for c in left])
        tried = [(c, c.distance if not chosen else dist(switch(reference, training, chosen + c.fields))) for c in left]
        out.renders += len(tried) if chosen else 0
        cause, distance = min(tried, key=lambda cd: cd[1])
        if not distance < current - least:  # no single cause helps: two that only act together may (twice at most)
            pairs_left -= 1
            switched = lambda fields: dist(switch(reference, training, fields))  # noqa: E731
            pair = None if pairs_left < 0 else _best_pair(tried, chosen, switched, out, prepare, reference, training)
            if pair is None or not pair[1] < current - least:
                break
            cause, distance = pair
            left = [c for c in left if not set(c.fields) & set(cause.fields)] + [cause]  # it is removed below
        chosen += cause.fields
        if math.isinf(result.gap):  # the sizes differ: the switch that makes them match closes it (as one cause)
            out.steps.append(Step(cause, distance, 1.0, 1.0))
            current = distance
            break
        out.steps.append(Step(cause, distance, (result.reference_distance - distance) / result.gap,
                              (current - distance) / result.gap))
        current = distance
        left.remove(cause)
    out.closed = current <= target or bool(chosen) and passes(render(switch(reference, training, chosen)))
    if not out.closed:
        out.why_not = (f"no other field moves it closer ({', '.join(c.name for c in left)} tried); " if left else
                       "every rendered field is switched and the thresholds still fail; ") + rest
    return out
